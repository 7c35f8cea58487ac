"""`unpack` checks every tar member before writing anything and leaves nothing behind when it refuses an archive.

Standard library only (plus dataset.downloads), so it also runs under the other Python versions the project accepts.
"""
import errno
import gzip
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from dataset.downloads import BadArchive, read_archive, unpack
from engine.errors import UserError


def add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"",
        mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode, info.mtime = kind, link, len(data), mode, 1_600_000_000
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tar_bytes(entries, compress: bool = True) -> bytes:
    """A tar(.gz) of (name, kind, link, data) entries, written in that order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for entry in entries:
            add(tar, *entry)
    return buffer.getvalue()


def realpath_exploit(extract_dir: Path) -> bytes:
    """The published CVE-2025-4517 archive: symlinks chained through directory names so long that the expanded path
    passes PATH_MAX, where os.path.realpath stops resolving and tarfile's data filter believes the links stay inside;
    `escape` then points at the parent of `extract_dir`, a hard link through it reaches `escape/flag`, and two files
    are written outside through them."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(extract_dir, "PC_PATH_MAX") - len(str(extract_dir)) - 1) // (len(steps) + 1))
    entries, path = [], ""
    for step in steps:
        entries += [(os.path.join(path, component), tarfile.DIRTYPE), (os.path.join(path, step), tarfile.SYMTYPE,
                                                                      component)]
        path = os.path.join(path, component)
    long_link = os.path.join(*steps, "l" * 254)
    entries += [(long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps))),
                ("escape", tarfile.SYMTYPE, os.path.join(long_link, "..")),
                ("flaglink", tarfile.LNKTYPE, os.path.join("escape", "flag")),
                ("flaglink", tarfile.REGTYPE, "", b"overwritten"),
                ("escape/newfile", tarfile.REGTYPE, "", b"new")]
    return tar_bytes(entries, compress=False)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (without following links) -> its bytes (None for directories and links)."""
    found = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory, name)
            found[str(path.relative_to(root))] = path.read_bytes() if path.is_file() and not path.is_symlink() \
                else None
    return found


@pytest.fixture
def layout(tmp_path):
    """tmp/ws/metaL_data (the data directory), with a file `flag` beside it that must never change."""
    data = tmp_path / "ws" / "metaL_data"
    data.mkdir(parents=True)
    (tmp_path / "ws" / "flag").write_bytes(b"original")
    return data


def test_the_realpath_exploit_archive_is_refused_whole(layout, tmp_path):
    # The archive is the real exploit: this Python's own data filter lets it write outside (a sandbox copy).
    sandbox = tmp_path / "sandbox" / "dest"
    sandbox.mkdir(parents=True)
    (sandbox.parent / "flag").write_bytes(b"original")
    with tarfile.open(fileobj=io.BytesIO(realpath_exploit(sandbox))) as tar:
        try:
            tar.extractall(sandbox, filter="data")
            escaped = (sandbox.parent / "newfile").exists()
        except tarfile.FilterError:  # a Python with the fix
            escaped = False
    if not escaped:
        pytest.skip("this Python's tarfile data filter already refuses the exploit archive")
    assert (sandbox.parent / "flag").read_bytes() == b"overwritten"

    archive = layout / "exploit.tar"
    archive.write_bytes(realpath_exploit(layout))
    before = tree(tmp_path / "ws")
    with pytest.raises(UserError) as refused:
        unpack(archive, layout)
    message = str(refused.value)
    assert message.startswith("exploit.tar: refused, nothing extracted: member 'a' is a symbolic link (to 'ddd")
    assert "\n" not in message and "plain files and directories" in message
    assert tree(tmp_path / "ws") == before  # nothing outside, nothing inside: no partial tree, no temporary folder
    assert (tmp_path / "ws" / "flag").read_bytes() == b"original"


def test_chained_links_are_refused_before_anything_is_written(layout, tmp_path):
    # a -> . and a/b -> ..: each link looks harmless alone, together a/b/ is the parent of the data directory.
    archive = layout / "chain.tar.gz"
    archive.write_bytes(tar_bytes([("chain/inside.txt", tarfile.REGTYPE, "", b"fine"), ("a", tarfile.SYMTYPE, "."),
                                   ("a/b", tarfile.SYMTYPE, ".."), ("a/b/escaped.txt", tarfile.REGTYPE, "", b"x")]))
    before = tree(tmp_path / "ws")
    with pytest.raises(UserError, match=r"^chain\.tar\.gz: refused, nothing extracted: member 'a' is a symbolic "
                                        r"link \(to '\.'\)"):
        unpack(archive, layout)
    assert tree(tmp_path / "ws") == before
    assert not (tmp_path / "ws" / "escaped.txt").exists() and not (layout / "chain").exists()


@pytest.mark.parametrize("name, kind, link, reason", [
    ("/abs/path.txt", tarfile.REGTYPE, "", "has an absolute path"),
    ("ok/../../outside.txt", tarfile.REGTYPE, "", "has a '..' component"),
    ("ok/link", tarfile.SYMTYPE, "inside.txt", "is a symbolic link (to 'inside.txt')"),  # even one staying inside
    ("ok/hard", tarfile.LNKTYPE, "ok/inside.txt", "is a hard link (to 'ok/inside.txt')"),
    ("ok/tty", tarfile.CHRTYPE, "", "is a device file"),
    ("ok/disk", tarfile.BLKTYPE, "", "is a device file"),
    ("ok/pipe", tarfile.FIFOTYPE, "", "is a FIFO"),
])
def test_unpack_refuses_anything_but_plain_files_and_directories(layout, tmp_path, name, kind, link, reason):
    archive = layout / "bad.tar"
    archive.write_bytes(tar_bytes([("ok/inside.txt", tarfile.REGTYPE, "", b"fine"), (name, kind, link)], False))
    before = tree(tmp_path / "ws")
    with pytest.raises(UserError) as refused:
        unpack(archive, layout)
    assert str(refused.value).startswith(f"bad.tar: refused, nothing extracted: member {name!r} {reason}; ")
    assert tree(tmp_path / "ws") == before


def test_unpack_refuses_a_path_that_is_both_file_and_directory(layout):
    archive = layout / "clash.tar.gz"
    archive.write_bytes(tar_bytes([("x/data", tarfile.REGTYPE, "", b"1"), ("x/data/more", tarfile.REGTYPE, "", b"2")]))
    with pytest.raises(UserError, match="'x/data' is both a file and a directory"):
        unpack(archive, layout)
    assert sorted(p.name for p in layout.iterdir()) == ["clash.tar.gz"]


def test_unpack_writes_plain_files_and_merges_into_existing_folders(layout):
    archive = layout / "miniImageNet.tar.gz"
    archive.write_bytes(tar_bytes([(".", tarfile.DIRTYPE), ("./miniImageNet", tarfile.DIRTYPE),
                                   ("./miniImageNet/a.pickle", tarfile.REGTYPE, "", b"A" * 3000),
                                   ("./miniImageNet/run.sh", tarfile.REGTYPE, "", b"#!/bin/sh\n", 0o4777),
                                   ("./miniImageNet/sub/b.pickle", tarfile.REGTYPE, "", b"B"),
                                   ("./README", tarfile.REGTYPE, "", b"readme")]))
    (layout / "miniImageNet").mkdir()
    (layout / "miniImageNet" / "a.pickle").write_bytes(b"A" * 3000)  # the same bytes: left as it is
    (layout / "miniImageNet" / "mine.txt").write_bytes(b"user file")
    summary = unpack(archive, layout)
    assert summary == "miniImageNet.tar.gz: 4 files, 3.0 kB -> created README, miniImageNet/ (existed)"
    assert tree(layout) == {"miniImageNet.tar.gz": archive.read_bytes(), ".miniImageNet.tar.gz.unpacked":
                            (layout / ".miniImageNet.tar.gz.unpacked").read_bytes(), "README": b"readme",
                            "miniImageNet": None, "miniImageNet/a.pickle": b"A" * 3000,
                            "miniImageNet/mine.txt": b"user file", "miniImageNet/run.sh": b"#!/bin/sh\n",
                            "miniImageNet/sub": None, "miniImageNet/sub/b.pickle": b"B"}
    # setuid and group/other write bits are not carried over; the owner's execute bit is
    assert (layout / "miniImageNet" / "run.sh").stat().st_mode & 0o7777 == 0o755
    assert (layout / "README").stat().st_mode & 0o7777 == 0o644
    assert (layout / "README").stat().st_mtime == 1_600_000_000
    assert unpack(archive, layout).endswith("already unpacked (delete .miniImageNet.tar.gz.unpacked to unpack it "
                                            "again)")


def test_unpack_never_writes_over_a_different_file(layout):
    archive = layout / "cu_birds.tar.gz"
    archive.write_bytes(tar_bytes([("cu_birds/new.pkl", tarfile.REGTYPE, "", b"new"),
                                   ("cu_birds/cub_train.pkl", tarfile.REGTYPE, "", b"archive's")]))
    (layout / "cu_birds").mkdir()
    (layout / "cu_birds" / "cub_train.pkl").write_bytes(b"the user's own")
    before = tree(layout)
    with pytest.raises(UserError, match=r"cu_birds\.tar\.gz: refused, nothing extracted: .*cu_birds/cub_train\.pkl "
                                        r"already exists and differs from the archive's cu_birds/cub_train\.pkl: "
                                        r"move it away and run again"):
        unpack(archive, layout)
    assert tree(layout) == before  # new.pkl was not moved in either


@pytest.mark.parametrize("cut, compress", [("half of the gzip", True), ("the gzip length trailer", True),
                                           ("the tar end blocks", False), ("inside a member", False)])
def test_a_truncated_archive_is_named_and_leaves_nothing(layout, cut, compress):
    whole = tar_bytes([("aircraft/one.pkl", tarfile.REGTYPE, "", b"\x01" * 5000),
                       ("aircraft/two.pkl", tarfile.REGTYPE, "", b"\x02" * 5000)], compress=False)
    end = len(whole.rstrip(b"\0"))  # where the last member's data ends and the zero blocks begin
    end += -end % 512
    cut_tar = {"the tar end blocks": whole[:end], "inside a member": whole[:end - 1000]}
    data = gzip.compress(whole) if compress else cut_tar[cut]
    data = {"half of the gzip": data[:len(data) // 2], "the gzip length trailer": data[:-4]}.get(cut, data)
    archive = layout / "aircraft.tar.gz"
    archive.write_bytes(data)
    with pytest.raises(UserError, match=r"aircraft\.tar\.gz is truncated \(.*\): delete it and download it again "
                                        r"\(make download_aircraft\)"):
        unpack(archive, layout)
    assert sorted(p.name for p in layout.iterdir()) == ["aircraft.tar.gz"]


def test_read_archive_finds_damage_that_tarfile_alone_passes(tmp_path):
    whole = tar_bytes([("x/one", tarfile.REGTYPE, "", b"1" * 600), ("x/two", tarfile.REGTYPE, "", b"2")], False)
    garbage_header = whole[:1536] + b"\x07" * 512 + whole[2048:]  # the second header overwritten
    (tmp_path / "g.tar").write_bytes(garbage_header)
    with tarfile.open(tmp_path / "g.tar") as tar:
        assert [m.name for m in tar] == ["x/one"]  # tarfile stops there without a word
    with pytest.raises(BadArchive, match=r"is damaged \(an unreadable tar header after member 'x/one'\)"):
        read_archive(tmp_path / "g.tar")
    flipped = bytearray(gzip.compress(whole))
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "f.tar.gz").write_bytes(bytes(flipped))
    with pytest.raises(BadArchive, match=r"is damaged \("):
        read_archive(tmp_path / "f.tar.gz")


@pytest.mark.parametrize("content, what", [
    (b"\xef\xbb\xbf<!DOCTYPE html><html>Log in</html>", "an HTML/XML page (a login, error or expired-link page)"),
    (b"<!-- figshare --><html></html>", "an HTML/XML page (a login, error or expired-link page)"),
    (b'{"message": "file not found", "code": "EntityNotFound"}', "a JSON document (an error answer)"),
])
def test_unpack_names_a_web_page_saved_as_the_archive(layout, content, what):
    (layout / "vgg_flower.tar.gz").write_bytes(content)
    with pytest.raises(UserError, match=rf"vgg_flower\.tar\.gz is {re.escape(what)}, not a gzip or tar archive: "
                                        r"delete it and download it again \(make download_vgg_flower\)"):
        unpack(layout / "vgg_flower.tar.gz", layout)


def test_a_failed_write_leaves_nothing_and_stale_folders_go(layout, monkeypatch):
    archive = layout / "mini60.tar.gz"
    archive.write_bytes(tar_bytes([("mini-60/a.npy", tarfile.REGTYPE, "", b"a"),
                                   ("mini-60/b.npy", tarfile.REGTYPE, "", b"b")]))
    (layout / ".mini60.tar.gz.killed.unpacking").mkdir()  # what a killed run leaves
    copies = []

    def disk_full_on_second(source, target, length):
        copies.append(target)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        target.write(source.read())

    monkeypatch.setattr(shutil, "copyfileobj", disk_full_on_second)
    with pytest.raises(UserError, match=r"cannot write into .*metaL_data \(\[Errno 28\] No space left on device\): "
                                        r"free disk space"):
        unpack(archive, layout)
    assert sorted(p.name for p in layout.iterdir()) == ["mini60.tar.gz"]
