"""The restricted unpickler: plain data loads (Python 2 pickles too); code-running, HTML or truncated files don't."""
import os
import pickle
import struct

import numpy as np
import pytest

from dataset.safe_pickle import load_pickle, save_pickle
from engine.errors import UserError


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes and numpy under its old module name, as the RFS pickles are."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj):
        header = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(obj))
        self.write(header + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", "") in ("numpy._core.multiarray", "numpy.core.multiarray"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def test_plain_data_round_trips(tmp_path):
    content = {"data": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), "labels": [3, 4], "name": "x",
               "scalar": np.int64(5), "nested": (1.5, {2, 3})}
    save_pickle(tmp_path / "d.pkl", content)
    loaded = load_pickle(tmp_path / "d.pkl")
    np.testing.assert_array_equal(loaded["data"], content["data"])
    assert loaded["labels"] == [3, 4] and loaded["scalar"] == 5 and loaded["nested"] == (1.5, {2, 3})
    assert os.listdir(tmp_path) == ["d.pkl"]  # the temporary file was renamed


def test_python2_pickle_with_numpy_array_loads(tmp_path):
    images = (np.arange(300) % 256).astype(np.uint8).reshape(10, 10, 3)  # bytes above 127: needs latin1
    path = tmp_path / "py2.pickle"
    with open(path, "wb") as handle:
        Python2Pickler(handle, protocol=2).dump({b"data": images, b"labels": [1, 2]})
    raw = path.read_bytes()
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    with pytest.raises(UnicodeDecodeError):  # what a plain Python 3 load does with it
        pickle.loads(raw)
    loaded = load_pickle(path)
    np.testing.assert_array_equal(loaded["data"], images)
    assert loaded["labels"] == [1, 2]


def test_python3_protocol2_pickle_of_an_array_loads(tmp_path):
    path = tmp_path / "p2.pkl"
    path.write_bytes(pickle.dumps({"data": np.arange(5, dtype=np.int64)}, protocol=2))
    np.testing.assert_array_equal(load_pickle(path)["data"], np.arange(5))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_code_running_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"data": RunsCode()}))
    with pytest.raises(UserError, match=r"refusing to load (posix|os)\.system, the pickle would run code"):
        load_pickle(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned.txt").exists()


def test_missing_html_and_truncated_files_name_the_path_and_target(tmp_path):
    with pytest.raises(UserError, match=r"missing data file .*nothere\.pkl \(run `make download_x`\)"):
        load_pickle(tmp_path / "nothere.pkl", "download_x")
    (tmp_path / "page.pkl").write_bytes(b"\n  <!DOCTYPE html><html>login</html>")
    with pytest.raises(UserError, match=r"page\.pkl is an HTML page, not data.*make download_x"):
        load_pickle(tmp_path / "page.pkl", "download_x")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"data": np.zeros(1000)})[:500])
    with pytest.raises(UserError, match=r"cut\.pkl is truncated or not a pickle") as err:
        load_pickle(tmp_path / "cut.pkl")
    assert "\n" not in str(err.value)


def test_web_pages_with_a_byte_order_mark_or_leading_comments_are_recognised():
    from dataset.safe_pickle import looks_like_html

    assert looks_like_html(b"\xef\xbb\xbf<!DOCTYPE html><html>")
    assert looks_like_html(b"<!-- served by x --> \n<!-- again --><html lang=en>")
    assert not looks_like_html(b"\x80\x04\x95<html")  # a pickle that merely contains the text
    assert not looks_like_html(b"<!-- unterminated")
