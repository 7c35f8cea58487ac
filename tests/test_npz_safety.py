"""read_npz_array reads the dtype from the .npy header before mapping anything: object and other non-numeric arrays,
damaged and non-zip files are one-line errors naming the file."""
import io
import zipfile

import numpy as np
import pytest

from dataset.fewshot.layouts import read_npz_array
from engine.errors import UserError

IMAGES = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_numeric_arrays_are_read_stored_ones_memory_mapped(tmp_path, save):
    save(tmp_path / "train_images.npz", images=IMAGES, other=np.ones(3))
    images = read_npz_array(tmp_path / "train_images.npz", "images", "download_tieredimagenet")
    assert np.array_equal(images, IMAGES) and images.dtype == np.uint8
    assert isinstance(images, np.memmap) == (save is np.savez)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("array, dtype", [
    (np.array([{"a": 1}, None], dtype=object), "object"),
    (np.zeros(2, dtype=[("x", np.uint8), ("y", object)]), "[('x', 'u1'), ('y', 'O')]"),
    (np.array(["a", "bc"]), "<U2"),
    (np.zeros(2, dtype="datetime64[s]"), "datetime64[s]"),
])
def test_non_numeric_arrays_are_refused_before_mapping(tmp_path, save, array, dtype):
    save(tmp_path / "x.npz", images=array)
    with pytest.raises(UserError) as refused:
        read_npz_array(tmp_path / "x.npz", "images", "download_tieredimagenet")
    assert str(refused.value) == (f"{tmp_path / 'x.npz'}: array 'images' has the non-numeric dtype {dtype}, refused "
                                  f"(an object array is a pickle, which can run code): write the images as a uint8 "
                                  f"array (run `make download_tieredimagenet`)")


def test_a_member_shorter_than_its_header_is_refused(tmp_path):
    npy = io.BytesIO()
    np.lib.format.write_array(npy, IMAGES)
    with zipfile.ZipFile(tmp_path / "cut.npz", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("images.npy", npy.getvalue()[:-10])  # a valid zip around a cut array
    with pytest.raises(UserError, match=rf"cut\.npz: array 'images' holds {len(npy.getvalue()) - 10} bytes where its "
                                        rf"header announces {len(npy.getvalue())}: the file is damaged"):
        read_npz_array(tmp_path / "cut.npz", "images", None)


@pytest.mark.parametrize("content", ["half", b"\xef\xbb\xbf<!DOCTYPE html><html>Log in</html>",
                                     b"<!-- a web page --><html></html>"])
def test_truncated_and_web_page_files_name_the_file(tmp_path, content):
    np.savez(tmp_path / "whole.npz", images=IMAGES)
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(whole[:len(whole) // 2] if content == "half" else content)
    reason = (r"is truncated or not an \.npz file \(File is not a zip file\)" if content == "half" else
              r"is an HTML page, not data: the download was replaced by a web page; delete it and download again")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'bad.npz'} {reason} \(run `make download_tieredimagenet`\)$"):
        read_npz_array(tmp_path / "bad.npz", "images", "download_tieredimagenet")
