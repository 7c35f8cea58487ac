"""Read dataset pickles without letting them run code.

Only plain containers, numbers, strings, bytes and numpy arrays may be reconstructed; anything else (a pickle
that would import and call a function) is refused. Python-2 pickles load with latin1 decoding.
"""
import pickle
from pathlib import Path

from engine.errors import UserError
from engine.workspace import written_atomically

_ALLOWED = {
    ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                                    "str", "bytes", "bytearray", "bool", "slice")
} | {
    ("__builtin__", name) for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "long",
                                       "str", "unicode", "bytes", "bytearray", "bool")
} | {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
     ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
     # Python 3 writes bytes (numpy's raw array data) as _codecs.encode(text, "latin1") under protocols 0-2.
     ("_codecs", "encode")}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allowed data types."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def looks_like_html(head: bytes) -> bool:
    """True when the first bytes of a file or response are a web page (a login or error page saved as data)."""
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # a UTF-8 byte-order mark first
    while start.startswith(b"<!--"):  # comments before the page
        start = start.partition(b"-->")[2].lstrip()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def make_hint(make_target: str | None) -> str:
    return f" (run `make {make_target}`)" if make_target else ""


def require_file(path: Path, make_target: str | None) -> Path:
    """`path` if it is a data file; otherwise the error a user can act on (missing, or a saved web page)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing data file {path}{make_hint(make_target)}")
    with open(path, "rb") as handle:
        if looks_like_html(handle.read(512)):
            raise UserError(f"{path} is an HTML page, not data: the download was replaced by a web page; "
                            f"delete it and download again{make_hint(make_target)}")
    return path


def load_pickle(path: Path, make_target: str | None = None):
    """Load a data pickle; a missing, HTML, truncated or code-running file is a `UserError` naming the path."""
    path = require_file(path, make_target)
    hint = make_hint(make_target)
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle, encoding="latin1").load()
        except _RefusedGlobal as exc:
            raise UserError(f"{path}: refusing to load {exc}, the pickle would run code; only plain data "
                            f"pickles (containers, numbers, strings, numpy arrays) are read") from None
        except Exception as exc:  # truncated or corrupt files raise many types (EOFError, UnpicklingError, ...)
            reason = (str(exc).splitlines() or [""])[0]
            raise UserError(f"{path} is truncated or not a pickle ({type(exc).__name__}: {reason}){hint}") from None


def save_pickle(path: Path, content) -> None:
    """Write a data pickle atomically (temporary file, then rename): readers never see half a file."""
    with written_atomically(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump(content, handle, protocol=4)
