"""make initialize_workspace / download_* / unpack_datasets end to end, against a local HTTP server on 127.0.0.1."""
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from dataset.downloads import download, unpack
from engine.errors import UserError
from mela_data_layouts import write_mini_imagenet, write_ximagenet

REPO = Path(__file__).resolve().parents[1]
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>figshare</title></head><body>Log in</body></html>"


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves `files` by name with HTTP Range support; names in `truncate_once` are cut off halfway the first
    time, names in `html` answer with a web page. `requests` records (name, Range header)."""

    def __init__(self, files: dict[str, bytes], truncate_once: set[str], html: set[str]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.truncate_once, self.html, self.requests = files, set(truncate_once), set(html), []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name, server = self.path.lstrip("/"), self.server
        server.requests.append((name, self.headers.get("Range")))
        if name in server.html:
            self._reply(200, HTML_PAGE, {"Content-Type": "text/html; charset=utf-8"})
            return
        if name not in server.files:
            self._reply(404, b"not found", {})
            return
        data, start, status, headers = server.files[name], 0, 200, {"Content-Type": "application/gzip"}
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if name in server.truncate_once:
            server.truncate_once.discard(name)
            self._reply(status, body, headers, send=len(body) // 2)
        else:
            self._reply(status, body, headers)

    def _reply(self, status: int, body: bytes, headers: dict, send: int | None = None):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:send])
        self.close_connection = True

    def log_message(self, *args):
        pass


def tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def tree_entries(root: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(root)}": p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make(*args: str, workspace: Path | None = None, mirror: str | None = None, cwd: Path = REPO):
    env = {k: v for k, v in os.environ.items() if k not in ("WORKSPACE", "METALABEL_MIRROR", "MAKEFLAGS")}
    variables = [f"PY={sys.executable}"] + ([f"WORKSPACE={workspace}"] if workspace else []) + \
        ([f"METALABEL_MIRROR={mirror}"] if mirror else [])
    # -o .venv/.installed: the test runs inside the environment `setup` makes; don't (re)install it here.
    command = ["make", "-s", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", ".venv/.installed",
               *variables, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def archives(tmp_path):
    """The seven archives: miniImageNet and mini60 hold loadable data; cu_birds is served as an HTML page,
    miniImageNet is cut off on its first transfer and vgg_flower tries to write outside the data directory."""
    classes = {"train": 5, "val": 5, "test": 5}
    write_mini_imagenet(tmp_path / "src" / "mini", classes, 4)
    write_ximagenet(tmp_path / "src" / "x60", classes, 4)
    files = {
        "aircraft.tar.gz": tar_gz({"aircraft/aircraft_train.pkl": b"a" * 100, "aircraft/README": b"ok"}),
        "miniImageNet.tar.gz": tar_gz(tree_entries(tmp_path / "src" / "mini", "miniImageNet")),
        "mini60.tar.gz": tar_gz(tree_entries(tmp_path / "src" / "x60", "mini-60")),
        "vgg_flower.tar.gz": tar_gz({"vgg_flower/vgg_train.pkl": b"v", "../escaped.txt": b"gotcha"}),
        **{f"{name}.tar.gz": tar_gz({f"{name}/x.npy": b"x"}) for name in ("tieredImageNet", "tiered780")},
    }
    server = ArchiveServer(files, truncate_once={"miniImageNet.tar.gz"}, html={"cu_birds.tar.gz"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_and_unpack_end_to_end(archives, tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    data = workspace / "metaL_data"
    run = make("download_all", workspace=workspace, mirror=archives.url)
    assert run.returncode != 0, run.stdout + run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert list(lines) == ["aircraft", "cu_birds", "vgg_flower", "miniImageNet", "mini60", "tieredImageNet",
                           "tiered780"]
    assert lines["aircraft"].startswith("downloaded")
    assert "FAILED" in lines["cu_birds"] and "served an HTML page instead of the archive" in lines["cu_birds"]
    assert "FAILED" in lines["miniImageNet"] and "transfer stopped at" in lines["miniImageNet"]
    assert "2 of 7 failed" in run.stderr
    assert not (data / "cu_birds.tar.gz").exists() and not (data / "cu_birds.tar.gz.part").exists()
    part = data / "miniImageNet.tar.gz.part"
    full = archives.files["miniImageNet.tar.gz"]
    assert not (data / "miniImageNet.tar.gz").exists() and part.stat().st_size == len(full) // 2

    run = make("download_miniimagenet", "download_aircraft", workspace=f"{workspace}/", mirror=archives.url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resumed at" in run.stdout and "aircraft: already complete" in run.stdout
    assert archives.requests[-1] == ("miniImageNet.tar.gz", f"bytes={len(full) // 2}-")
    assert (data / "miniImageNet.tar.gz").read_bytes() == full and not part.exists()

    run = make("unpack_datasets", workspace=workspace)
    assert run.returncode != 0 and "1 of 6 failed" in run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert "refused, nothing extracted" in lines["vgg_flower.tar.gz"] and "escaped.txt" in lines["vgg_flower.tar.gz"]
    assert not (workspace / "escaped.txt").exists() and not (data / "vgg_flower").exists()
    assert "created miniImageNet/" in lines["miniImageNet.tar.gz"] and "3 files" in lines["miniImageNet.tar.gz"]
    assert "created mini-60/" in lines["mini60.tar.gz"]
    assert (data / "aircraft" / "README").read_bytes() == b"ok"
    run = make("unpack_datasets", workspace=workspace)
    assert "miniImageNet.tar.gz: already unpacked" in run.stdout

    monkeypatch.setenv("WORKSPACE", str(workspace))  # the unpacked data loads ("mini-60": the readme's name)
    from dataset.fewshot import dataset_config, load_split

    assert load_split(dataset_config("miniImageNet"), "val")[0].flat.n_cls == 5
    assert load_split(dataset_config("mini60"), "test")[0].flat.images.shape == (20, 12, 12, 3)


def test_download_finishes_a_complete_part_file_and_names_http_errors(archives, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    full = archives.files["tiered780.tar.gz"]
    (data / "tiered780.tar.gz.part").write_bytes(full)  # interrupted after the last byte, before the rename
    summary = download("tiered780", f"{archives.url}/tiered780.tar.gz", data)
    assert summary.startswith("tiered780: downloaded") and (data / "tiered780.tar.gz").read_bytes() == full
    with pytest.raises(UserError, match=r"HTTP 404 Not Found from http://127\.0\.0\.1:\d+/nothing\.tar\.gz"):
        download("nothing", f"{archives.url}/nothing.tar.gz", data)


def test_initialize_workspace_with_any_posix_shell(tmp_path):
    for workspace in (tmp_path / "a", f"{tmp_path / 'b'}/"):
        assert make("initialize_workspace", workspace=workspace).returncode == 0
        assert (Path(workspace) / "metaL_data").is_dir()
        assert (Path(workspace) / "checkpoint" / "label_learn" / "saves").is_dir()
    assert make("initialize_workspace", cwd=tmp_path).returncode == 0  # WORKSPACE unset: ./workspace
    assert (tmp_path / "workspace" / "metaL_data").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "workspace"]


@pytest.mark.parametrize("entry", ["/abs/path.txt", "ok/../../outside.txt", "link"])
def test_unpack_refuses_entries_landing_outside(entry, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(tarfile.TarInfo("ok/inside.txt"), io.BytesIO())
        info = tarfile.TarInfo(entry)
        if entry == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "../../etc"
        tar.addfile(info, io.BytesIO())
    with pytest.raises(UserError, match="bad.tar: refused, nothing extracted"):
        unpack(archive, data)
    assert sorted(p.name for p in data.iterdir()) == ["bad.tar"]


def test_unpack_names_a_corrupt_archive(tmp_path):
    (tmp_path / "cut.tar.gz").write_bytes(tar_gz({"a/b.bin": np.arange(10**5).tobytes()})[:2000])
    with pytest.raises(UserError, match=r"cut\.tar\.gz is truncated or not a tar archive.*download it again"):
        unpack(tmp_path / "cut.tar.gz", tmp_path)
