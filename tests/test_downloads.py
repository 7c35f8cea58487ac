"""make initialize_workspace / download_* / unpack_datasets, and every way a download can look complete without being
so, against a local HTTP server on 127.0.0.1 (stopped by the fixture; each connection times out after 10 s)."""
import gzip
import hashlib
import http.server
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from mela_data_layouts import write_mini_imagenet, write_ximagenet

import dataset.downloads as downloads
from dataset.downloads import download, read_manifest
from engine.errors import UserError
from tools.download import main

REPO = Path(__file__).resolve().parents[1]
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>figshare</title></head><body>Log in</body></html>"
FIRST_DATE, SECOND_DATE = "Mon, 01 Jan 2024 00:00:00 GMT", "Tue, 02 Jan 2024 00:00:00 GMT"


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves `files` by name with Range / If-Range support (RFC 9110: a changed file is sent whole). `faults` maps a
    name to the faults of its next answers, one per request:
      truncate         the body stops halfway, under the full Content-Length
      close_early      no Content-Length, and the connection closes halfway
      wrong_range      a 206 whose Content-Range names other bytes than those asked for
      no_content_range a 206 without Content-Range
      lying_body       a 206 with the right Content-Range but the file's first bytes
    `validators`: which of ETag / Last-Modified it sends; `requests` records (name, Range, If-Range)."""

    def __init__(self, files: dict[str, bytes], faults: dict | None = None, types: dict | None = None,
                 validators=("etag", "last_modified")):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.faults, self.types, self.validators = files, faults or {}, types or {}, validators
        self.modified, self.requests = {}, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self):
        name, server = self.path.lstrip("/"), self.server
        server.requests.append((name, self.headers.get("Range"), self.headers.get("If-Range")))
        fault = server.faults[name].pop(0) if server.faults.get(name) else None
        if name not in server.files:
            self._reply(404, b"not found", {})
            return
        data = server.files[name]
        etag, modified = f'"{hashlib.sha256(data).hexdigest()[:16]}"', server.modified.get(name, FIRST_DATE)
        headers = {"Content-Type": server.types.get(name, "application/gzip"),
                   **({"ETag": etag} if "etag" in server.validators else {}),
                   **({"Last-Modified": modified} if "last_modified" in server.validators else {})}
        start, status, if_range = 0, 200, self.headers.get("If-Range")
        if self.headers.get("Range") and if_range in (None, etag, modified):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault == "wrong_range":
            headers["Content-Range"] = f"bytes 0-{len(body) - 1}/{len(data)}"
        elif fault == "no_content_range":
            del headers["Content-Range"]
        elif fault == "lying_body":
            body = data[:len(body)]
        self._reply(status, body, headers, send=len(body) // 2 if fault in ("truncate", "close_early") else None,
                    announce_length=fault != "close_early")

    def _reply(self, status: int, body: bytes, headers: dict, send: int | None = None, announce_length=True):
        self.send_response(status)
        for key, value in {**headers, **({"Content-Length": str(len(body))} if announce_length else {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:send])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(files, ...) -> a running ArchiveServer; every server started is stopped at the end of the test."""
    servers = []

    def start(files, **options):
        server = ArchiveServer(files, **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setattr(downloads, "TIMEOUT_S", 10)


def tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def random_archive(seed: int) -> bytes:
    """A .tar.gz of random bytes, stored uncompressed: archives of different seeds have the same length."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("aircraft/aircraft_train.pkl")
        info.size = 40_000
        tar.addfile(info, io.BytesIO(np.random.default_rng(seed).bytes(info.size)))
    return gzip.compress(buffer.getvalue(), compresslevel=0, mtime=0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


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
def archives(tmp_path, serve):
    """The seven archives: miniImageNet and mini60 hold loadable data; cu_birds is served as an HTML page,
    miniImageNet is cut off on its first transfer and vgg_flower tries to write outside the data directory."""
    classes = {"train": 5, "val": 5, "test": 5}
    write_mini_imagenet(tmp_path / "src" / "mini", classes, 4)
    write_ximagenet(tmp_path / "src" / "x60", classes, 4)
    files = {
        "aircraft.tar.gz": tar_gz({"aircraft/aircraft_train.pkl": b"a" * 100, "aircraft/README": b"ok"}),
        "cu_birds.tar.gz": HTML_PAGE,
        "miniImageNet.tar.gz": tar_gz(tree_entries(tmp_path / "src" / "mini", "miniImageNet")),
        "mini60.tar.gz": tar_gz(tree_entries(tmp_path / "src" / "x60", "mini-60")),
        "vgg_flower.tar.gz": tar_gz({"vgg_flower/vgg_train.pkl": b"v", "../escaped.txt": b"gotcha"}),
        **{f"{name}.tar.gz": tar_gz({f"{name}/x.npy": b"x"}) for name in ("tieredImageNet", "tiered780")},
    }
    return serve(files, faults={"miniImageNet.tar.gz": ["truncate"]}, types={"cu_birds.tar.gz": "text/html"})


def test_download_and_unpack_end_to_end(archives, tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    data = workspace / "metaL_data"
    run = make("download_all", workspace=workspace, mirror=archives.url)
    assert run.returncode != 0, run.stdout + run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert list(lines) == ["aircraft", "cu_birds", "vgg_flower", "miniImageNet", "mini60", "tieredImageNet",
                           "tiered780"]
    assert lines["aircraft"].startswith("downloaded")
    assert "FAILED" in lines["cu_birds"] and \
        "served an HTML/XML page (a login, error or expired-link page) instead of the archive" in lines["cu_birds"]
    assert "FAILED" in lines["miniImageNet"] and "transfer stopped at" in lines["miniImageNet"]
    assert "2 of 7 failed" in run.stderr
    assert not (data / "cu_birds.tar.gz").exists() and not (data / "cu_birds.tar.gz.part").exists()
    part = data / "miniImageNet.tar.gz.part"
    full = archives.files["miniImageNet.tar.gz"]
    assert not (data / "miniImageNet.tar.gz").exists() and part.stat().st_size == len(full) // 2
    wrong_pin = "DOWNLOAD_ARGS=--sha256 miniImageNet=" + "0" * 64
    run = make("download_miniimagenet", wrong_pin, workspace=workspace, mirror=archives.url)
    assert run.returncode != 0 and f"has sha256 {sha256(full)}, not the pinned {'0' * 64}" in run.stdout
    assert not (data / "miniImageNet.tar.gz").exists() and part.read_bytes() == full  # kept: the pin may be wrong

    right_pin = f"DOWNLOAD_ARGS=--sha256 miniImageNet={sha256(full)}"
    run = make("download_miniimagenet", "download_aircraft", right_pin, workspace=f"{workspace}/",
               mirror=archives.url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "miniImageNet: downloaded" in run.stdout and "aircraft: already complete" in run.stdout
    assert archives.requests[-1] == ("miniImageNet.tar.gz", f"bytes={len(full)}-", f'"{sha256(full)[:16]}"')
    assert (data / "miniImageNet.tar.gz").read_bytes() == full and not part.exists()
    assert read_manifest(data / "miniImageNet.tar.gz") == (sha256(full), len(full))
    if shutil.which("sha256sum"):  # the manifests are in sha256sum's format
        checked = subprocess.run(["sha256sum", "-c", "miniImageNet.tar.gz.sha256", "aircraft.tar.gz.sha256"],
                                 cwd=data, capture_output=True, text=True)
        assert checked.returncode == 0 and checked.stdout.count(": OK") == 2, checked.stdout + checked.stderr

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


@pytest.mark.parametrize("cut", ["half", "the length trailer"])
def test_a_truncated_archive_under_its_own_length_is_not_kept(serve, tmp_path, cut):
    full = random_archive(0)
    server = serve({"aircraft.tar.gz": full[:len(full) // 2] if cut == "half" else full[:-4]})
    with pytest.raises(UserError, match=r"^http://127\.0\.0\.1:\d+/aircraft\.tar\.gz served an archive that is "
                                        r"truncated \(Compressed file ended before the end-of-stream marker was "
                                        r"reached\); aircraft\.tar\.gz\.part was deleted: try again later"):
        download("aircraft", f"{server.url}/aircraft.tar.gz", tmp_path)
    assert listing(tmp_path) == []


def test_a_connection_closed_early_without_length_is_resumed(serve, tmp_path):
    full = random_archive(0)
    server = serve({"aircraft.tar.gz": full}, faults={"aircraft.tar.gz": ["close_early"]})
    url = f"{server.url}/aircraft.tar.gz"
    with pytest.raises(UserError, match=r"connection closed at .* without telling the length, and the archive is "
                                        r"truncated .*kept in aircraft\.tar\.gz\.part: run the same command again"):
        download("aircraft", url, tmp_path)
    assert listing(tmp_path) == ["aircraft.tar.gz.part", "aircraft.tar.gz.part.json"]
    assert (tmp_path / "aircraft.tar.gz.part").read_bytes() == full[:len(full) // 2]
    assert "resumed at" in download("aircraft", url, tmp_path)
    assert server.requests[-1] == ("aircraft.tar.gz", f"bytes={len(full) // 2}-", f'"{sha256(full)[:16]}"')
    assert (tmp_path / "aircraft.tar.gz").read_bytes() == full
    assert listing(tmp_path) == ["aircraft.tar.gz", "aircraft.tar.gz.sha256"]


@pytest.mark.parametrize("body, what", [
    (b"\xef\xbb\xbf<!DOCTYPE html><html><body>Log in</body></html>", "an HTML/XML page"),
    (b"<!-- figshare page -->\n<html><body>The link has expired</body></html>", "an HTML/XML page"),
    (b'{"message": "Entity not found: file", "code": "EntityNotFound"}', "a JSON document"),
])
def test_pages_and_error_bodies_are_not_archives(serve, tmp_path, body, what):
    server = serve({"cu_birds.tar.gz": body}, types={"cu_birds.tar.gz": "application/octet-stream"})
    with pytest.raises(UserError, match=rf"/cu_birds\.tar\.gz served {re.escape(what)}.* instead of the archive: check "
                                        rf"the address, or give another mirror with --mirror / \$METALABEL_MIRROR$"):
        download("cu_birds", f"{server.url}/cu_birds.tar.gz", tmp_path)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fault", ["wrong_range", "no_content_range", "lying_body"])
def test_a_wrong_resume_answer_starts_over(serve, tmp_path, fault):
    full = random_archive(0)
    server = serve({"aircraft.tar.gz": full}, faults={"aircraft.tar.gz": ["truncate", fault]})
    url = f"{server.url}/aircraft.tar.gz"
    with pytest.raises(UserError, match="transfer stopped at"):
        download("aircraft", url, tmp_path)
    summary = download("aircraft", url, tmp_path)
    assert "started over (" in summary and "resumed at" not in summary
    assert [r[1] for r in server.requests] == [None, f"bytes={len(full) // 2}-", None]
    assert (tmp_path / "aircraft.tar.gz").read_bytes() == full


@pytest.mark.parametrize("validators", [("etag",), ("last_modified",), ()])
def test_a_file_changed_on_the_server_is_downloaded_again_whole(serve, tmp_path, validators):
    first, second = random_archive(1), random_archive(2)
    assert len(first) == len(second) and first != second  # only a resume check or the read-through can tell
    server = serve({"aircraft.tar.gz": first}, faults={"aircraft.tar.gz": ["truncate"]}, validators=validators)
    url = f"{server.url}/aircraft.tar.gz"
    with pytest.raises(UserError, match="transfer stopped at"):
        download("aircraft", url, tmp_path)
    server.files["aircraft.tar.gz"], server.modified["aircraft.tar.gz"] = second, SECOND_DATE
    summary = download("aircraft", url, tmp_path)
    assert (tmp_path / "aircraft.tar.gz").read_bytes() == second
    sent_if_range = server.requests[1][2]
    if validators:  # If-Range with the first file's validator: the server sent the new file whole
        assert sent_if_range == {"etag": f'"{sha256(first)[:16]}"', "last_modified": FIRST_DATE}[validators[0]]
        assert "resumed at" not in summary and "started over" not in summary and len(server.requests) == 2
    else:  # nothing to tell the server: the mixed file fails the read-through and the download starts over
        assert sent_if_range is None and "started over (the resumed file is damaged" in summary
        assert [r[1] for r in server.requests] == [None, f"bytes={len(first) // 2}-", None]


def test_an_archive_already_on_disk_is_checked_not_trusted(serve, tmp_path):
    full = random_archive(0)
    server = serve({"aircraft.tar.gz": full})
    url, target = f"{server.url}/aircraft.tar.gz", tmp_path / "aircraft.tar.gz"
    target.write_bytes(full[:1000])  # e.g. an interrupted `wget -O`: no manifest
    summary = download("aircraft", url, tmp_path)
    assert "the existing aircraft.tar.gz is truncated (" in summary and "resumed at 1.0 kB" in summary
    assert target.read_bytes() == full and read_manifest(target) == (sha256(full), len(full))

    n_requests = len(server.requests)
    assert download("aircraft", url, tmp_path) == (f"aircraft: already complete (51.2 kB, sha256 {sha256(full)}, "
                                                   f"matches aircraft.tar.gz.sha256), skipped")
    assert len(server.requests) == n_requests

    damaged = bytearray(full)
    damaged[20_000] ^= 1
    target.write_bytes(bytes(damaged))  # same size, other bytes
    summary = download("aircraft", url, tmp_path)
    assert f"the existing aircraft.tar.gz has sha256 {sha256(bytes(damaged))}, not the {sha256(full)} recorded in " \
           f"aircraft.tar.gz.sha256: deleted" in summary and target.read_bytes() == full

    target.write_bytes(full[:30_000])
    summary = download("aircraft", url, tmp_path)
    assert f"the existing aircraft.tar.gz has 30000 bytes but aircraft.tar.gz.sha256 records {len(full)}: " \
           f"resumed" in summary and target.read_bytes() == full

    manifest = tmp_path / "aircraft.tar.gz.sha256"
    manifest.unlink()  # an archive put there by hand is read through, then recorded
    assert "read through, aircraft.tar.gz.sha256 written), skipped" in download("aircraft", url, tmp_path)
    assert read_manifest(target) == (sha256(full), len(full))
    assert listing(tmp_path) == ["aircraft.tar.gz", "aircraft.tar.gz.sha256"]


def test_pinned_checksums_from_a_file(serve, tmp_path, capsys):
    full = random_archive(0)
    server = serve({"aircraft.tar.gz": full})
    checksums = tmp_path / "SHA256SUMS"
    data = tmp_path / "data"
    checksums.write_text(f"# the archives' checksums\n{'ab' * 32} *elsewhere/aircraft.tar.gz\n\n")
    assert main(["--data-dir", str(data), "download", "--mirror", server.url, "--checksums", str(checksums),
                 "aircraft"]) == 1
    assert f"aircraft.tar.gz.part has sha256 {sha256(full)}, not the pinned {'ab' * 32}; it is kept as " \
           f"aircraft.tar.gz.part: correct the checksum" in capsys.readouterr().out
    assert listing(data) == ["aircraft.tar.gz.part", "aircraft.tar.gz.part.json"]

    checksums.write_text(f"{sha256(full).upper()}  aircraft.tar.gz\n")
    assert main(["--data-dir", str(data), "download", "--mirror", server.url, "--checksums", str(checksums),
                 "aircraft"]) == 0
    assert server.requests[-1][1] == f"bytes={len(full)}-"  # the kept file was not fetched again (HTTP 416)
    assert (data / "aircraft.tar.gz").read_bytes() == full
    # a pin that disagrees with an archive already there: it becomes the .part again, nothing is trusted
    assert main(["--data-dir", str(data), "download", "--mirror", server.url, "--sha256", f"AIRCRAFT={'0' * 64}",
                 "aircraft"]) == 1
    assert f"not the pinned {'0' * 64}" in capsys.readouterr().out and not (data / "aircraft.tar.gz").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--sha256", "aircraft"], "--sha256 aircraft: expected NAME=HEX"),
    (["--sha256", "aircraft=abc"], "--sha256 aircraft=abc: 'abc' is not a sha256 checksum: give 64 hexadecimal"),
    (["--sha256", f"planes={'0' * 64}"], "unknown archive 'planes': choose from aircraft, cu_birds"),
    (["--sha256", f"aircraft={'0' * 64}", "--sha256", f"aircraft.tar.gz={'1' * 64}"],
     "aircraft is pinned to two different checksums: keep one"),
    (["--checksums", "{dir}/sums"], "line 2: expected '<sha256>  <name>.tar.gz' (the format of sha256sum), "
                                    "found 'oops'"),
    (["--checksums", "{dir}/missing"], "missing: cannot read it"),
])
def test_checksum_options_are_checked_before_anything_is_fetched(serve, tmp_path, capsys, arguments, message):
    server = serve({})
    (tmp_path / "sums").write_text(f"{'0' * 64}  aircraft.tar.gz\noops\n")
    arguments = [argument.format(dir=tmp_path) for argument in arguments]
    assert main(["--data-dir", str(tmp_path / "data"), "download", "--mirror", server.url, *arguments, "all"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert server.requests == [] and not (tmp_path / "data").exists()


def test_download_finishes_a_complete_part_file_and_names_http_errors(serve, tmp_path):
    full = tar_gz({"tiered780/x.npy": b"x"})
    server = serve({"tiered780.tar.gz": full})
    (tmp_path / "tiered780.tar.gz.part").write_bytes(full)  # interrupted after the last byte, before the rename
    summary = download("tiered780", f"{server.url}/tiered780.tar.gz", tmp_path)
    assert summary.startswith("tiered780: downloaded") and (tmp_path / "tiered780.tar.gz").read_bytes() == full
    with pytest.raises(UserError, match=r"HTTP 404 Not Found from http://127\.0\.0\.1:\d+/nothing\.tar\.gz: check "
                                        r"the address"):
        download("nothing", f"{server.url}/nothing.tar.gz", tmp_path)


def test_initialize_workspace_with_any_posix_shell(tmp_path):
    for workspace in (tmp_path / "a", f"{tmp_path / 'b'}/"):
        assert make("initialize_workspace", workspace=workspace).returncode == 0
        assert (Path(workspace) / "metaL_data").is_dir()
        assert (Path(workspace) / "checkpoint" / "label_learn" / "saves").is_dir()
    assert make("initialize_workspace", cwd=tmp_path).returncode == 0  # WORKSPACE unset: ./workspace
    assert (tmp_path / "workspace" / "metaL_data").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "workspace"]


def test_cifar_commands_fetch_into_the_data_dir(monkeypatch, tmp_path, capsys):
    """`python -m tools.download cifar100 | cifar10` (make download_cifar100 / download_cifar10): torchvision's
    download into the data directory (replaced here, so nothing is fetched)."""
    calls = []
    monkeypatch.setattr("dataset.cifar100.download", lambda data_dir, cifar10: calls.append((data_dir, cifar10))
                        or data_dir / "cifar")
    assert main(["--data-dir", str(tmp_path), "cifar10"]) == 0 and main(["--data-dir", str(tmp_path), "cifar100"]) == 0
    assert calls == [(tmp_path.resolve(), True), (tmp_path.resolve(), False)]
    assert capsys.readouterr().out.splitlines() == [f"ready: {tmp_path.resolve() / 'cifar'}"] * 2
