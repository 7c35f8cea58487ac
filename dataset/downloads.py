"""Download, check and unpack the MeLa archives: the library behind `python -m tools.download` (the Makefile's
download_* and unpack_datasets targets). Archive NAME comes from its figshare address in `ARCHIVES`, or from
<mirror>/NAME.tar.gz with --mirror / $METALABEL_MIRROR (`archive_url`).

`download` fetches into NAME.tar.gz.part (resumable: Range + If-Range on the ETag / Last-Modified kept in
NAME.tar.gz.part.json, so a file changed on the server starts over) and renames it NAME.tar.gz only once it was
read through and matched any pinned checksum; the manifest NAME.tar.gz.sha256 then records its size and sha256.
`unpack` checks every member before anything is written (only plain files and directories at relative paths
without '..') and extracts through a temporary folder in the data folder, so a refused or broken archive leaves
nothing behind. Both return one summary line.
"""
import filecmp
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from engine.errors import UserError
from engine.workspace import written_atomically

FIGSHARE = "https://figshare.com/ndownloader/files"
ARCHIVES = {  # archive name -> the original address
    "aircraft": f"{FIGSHARE}/37914690?private_link=a413a04a37d189638118",
    "cu_birds": f"{FIGSHARE}/37832133?private_link=3c10efda4881af51db57",
    "vgg_flower": f"{FIGSHARE}/37832118?private_link=9c42222e62f2b6013568",
    "miniImageNet": f"{FIGSHARE}/37911240?private_link=ab81ddf3fd85f775cc6d",
    "mini60": f"{FIGSHARE}/37835829?private_link=fc867135b430db59ceaf",
    "tieredImageNet": f"{FIGSHARE}/38009146?private_link=a7afdc3fb808064be581",
    "tiered780": f"{FIGSHARE}/37836714?private_link=89a52d40c31da8724b61",
}
MIRROR_VARIABLE = "METALABEL_MIRROR"
ANOTHER_MIRROR = f"give another mirror with --mirror / ${MIRROR_VARIABLE}"
MIRROR_FIX = f"check the address, or {ANOTHER_MIRROR}"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CHUNK = 1 << 20
TIMEOUT_S = 60
BLOCK = tarfile.BLOCKSIZE
GZIP_MAGIC = b"\x1f\x8b"
BYTE_ORDER_MARKS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
MANIFEST_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
MANIFEST_SIZE = re.compile(r"# size: (\d+)")


class BadArchive(Exception):
    """The file is not the archive; `resumable` when it may be a correct start of it (kept, to resume)."""

    def __init__(self, reason: str, resumable: bool = False):
        super().__init__(reason)
        self.resumable = resumable


class _Restart(Exception):
    """What a resumed transfer produced cannot be trusted: start again from the first byte."""


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.2f} GB"


def _canonical_name(name: str) -> str | None:
    """The archive `name` stands for (any case, with or without .tar.gz), or None."""
    return {known.lower(): known for known in ARCHIVES}.get(name.lower().removesuffix(".tar.gz"))


def archive_names(requested: list[str]) -> list[str]:
    """Archive names as the user typed them (any case, as in the make targets), or `all`."""
    if requested == ["all"]:
        return list(ARCHIVES)
    unknown = [name for name in requested if _canonical_name(name) is None]
    if unknown or not requested:
        raise UserError(f"unknown archive {' '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join(ARCHIVES)} or all")
    return [_canonical_name(name) for name in requested]


def archive_url(name: str, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{name}.tar.gz" if mirror else ARCHIVES[name]


def _download_hint(archive_name: str) -> str:
    known = _canonical_name(archive_name)
    return f" (make download_{known.lower()})" if known else ""


# ---- Is it the archive? -------------------------------------------------------------------------------------------

def describe_non_archive(head: bytes) -> str | None:
    """None when `head` (the first bytes) starts a gzip or tar archive; otherwise what it looks like."""
    if head.startswith(GZIP_MAGIC) or head[257:262] == b"ustar":
        return None
    text = head
    for mark in BYTE_ORDER_MARKS:
        text = text.removeprefix(mark)
    text = text.lstrip().lower()
    if not head:
        return "an empty file"
    if text.startswith(b"<"):  # <!DOCTYPE, <html, <!-- a comment -->, <?xml: a login, error or expired-link page
        return "an HTML/XML page (a login, error or expired-link page)"
    if text.startswith((b"{", b"[")):
        return "a JSON document (an error answer)"
    return f"neither gzip nor tar data (it starts with {head[:8].hex(' ')})"


class _LastRead:
    """A file wrapper that keeps the last bytes read. tarfile ends its member list both at the end-of-archive zero
    block and, silently, at a block it cannot parse or at the end of the data; this tells them apart without
    seeking back (in a gzip stream that would mean decompressing from the start again)."""

    def __init__(self, raw):
        self.raw, self.last = raw, b""

    def read(self, size: int = -1) -> bytes:
        self.last = self.raw.read(size)
        return self.last

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


@contextmanager
def _open_tar(path: Path):
    """(tarfile, reader) over the bytes of a gzip-compressed or plain tar file; BadArchive for anything else."""
    with open(path, "rb") as raw:
        head = raw.read(BLOCK)
        what = describe_non_archive(head)
        if what:
            raise BadArchive(f"is {what}, not a gzip or tar archive")
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if head.startswith(GZIP_MAGIC) else raw
        reader = _LastRead(stream)
        with tarfile.open(fileobj=reader, mode="r:") as tar:
            yield tar, reader


def _damage(exc: Exception) -> BadArchive:
    """The read error of a gzip or tar stream as a BadArchive: data that ends early is a truncated file."""
    if isinstance(exc, EOFError) or "unexpected end of data" in str(exc):
        return BadArchive(f"is truncated ({exc or 'the data ends early'})", resumable=True)
    return BadArchive(f"is damaged ({exc})")


def read_archive(path: Path) -> list[tarfile.TarInfo]:
    """Every member of archive `path`, after reading all of it: every tar header, the two zero blocks that end a
    tar archive, and for gzip the CRC and length trailer. BadArchive when a check fails."""
    try:
        with _open_tar(path) as (tar, reader):
            members = list(tar)
            after = f"after member {members[-1].name!r}" if members else "at its start"
            if reader.last != bytes(BLOCK) or reader.read(BLOCK) != bytes(BLOCK):
                if len(reader.last) < BLOCK:
                    raise BadArchive(f"is truncated (the data ends {after}, without the end-of-archive blocks)",
                                     resumable=True)
                raise BadArchive(f"is damaged (an unreadable tar header {after})")
            while reader.read(CHUNK):  # on to the end: a gzip stream checks its CRC and length there
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damage(exc) from None
    if not members:
        raise BadArchive("is an empty tar archive")
    return members


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- Manifest, resume state, pinned checksums ---------------------------------------------------------------------

def manifest_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def write_manifest(target: Path, digest: str, size: int, url: str) -> None:
    """NAME.tar.gz.sha256 in sha256sum's format (`sha256sum -c` checks it; it skips the # lines)."""
    with written_atomically(manifest_path(target)) as tmp:
        tmp.write_text(f"# metalabel download manifest, from {url}\n# size: {size}\n{digest}  {target.name}\n")


def read_manifest(target: Path) -> tuple[str, int] | None:
    """(sha256, size) recorded for `target`, or None when there is no readable manifest."""
    try:
        lines = manifest_path(target).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    sizes = [int(m[1]) for m in map(MANIFEST_SIZE.fullmatch, lines) if m]
    digests = [m[1] for m in map(MANIFEST_LINE.fullmatch, lines) if m and m[2] == target.name]
    return (digests[0], sizes[0]) if len(sizes) == 1 and len(digests) == 1 else None


def _resume_state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_resume_state(part: Path) -> dict:
    try:
        state = json.loads(_resume_state_path(part).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _resume_state_path(part).unlink(missing_ok=True)


def pinned_checksums(pairs: list[str], checksums_file: Path | None) -> dict[str, str]:
    """Archive name -> sha256 from `--sha256 NAME=HEX` values and a sha256sum-style file (`HEX  NAME.tar.gz`)."""
    pins: dict[str, str] = {}

    def pin(name: str, digest: str, where: str) -> None:
        archive = _canonical_name(name)
        if archive is None:
            raise UserError(f"{where}: unknown archive {name!r}: choose from {', '.join(ARCHIVES)}")
        if not SHA256_HEX.fullmatch(digest):
            raise UserError(f"{where}: {digest!r} is not a sha256 checksum: give 64 hexadecimal digits")
        if pins.setdefault(archive, digest.lower()) != digest.lower():
            raise UserError(f"{where}: {archive} is pinned to two different checksums: keep one")

    if checksums_file is not None:
        try:
            lines = Path(checksums_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--checksums {checksums_file}: cannot read it ({exc}): give a text file of "
                            f"'<sha256>  <name>.tar.gz' lines") from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2:
                raise UserError(f"--checksums {checksums_file} line {number}: expected '<sha256>  <name>.tar.gz' "
                                f"(the format of sha256sum), found {line.strip()!r}")
            pin(PurePosixPath(fields[1].lstrip("*")).name, fields[0], f"--checksums {checksums_file} line {number}")
    for pair in pairs:
        name, equals, digest = pair.partition("=")
        if not equals:
            raise UserError(f"--sha256 {pair}: expected NAME=HEX, e.g. --sha256 aircraft=<64 hex digits>")
        pin(name, digest, f"--sha256 {pair}")
    return pins


# ---- Download -----------------------------------------------------------------------------------------------------

def _open(url: str, start: int, validator: str | None):
    """The response for bytes `start`.. of `url` (If-Range: only while the file is still `validator`), or None
    when the server says the .part already holds all of it."""
    request = urllib.request.Request(url, headers={"User-Agent": "metalabel-downloads"})
    if start:
        request.add_header("Range", f"bytes={start}-")
        if validator:
            request.add_header("If-Range", validator)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # range not satisfiable: the .part may already hold the whole file
            total = exc.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == start:
                return None
            raise _Restart(f"the server cannot resume at byte {start} (HTTP 416, Content-Range "
                           f"{exc.headers.get('Content-Range')!r})") from None
        raise UserError(f"HTTP {exc.code} {exc.reason} from {url}: {MIRROR_FIX}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        raise UserError(f"cannot reach {url} ({getattr(exc, 'reason', exc)}): check the network and the address, "
                        f"or {ANOTHER_MIRROR}") from None


def _resumed_end(response, start: int, state: dict) -> int:
    """Where a 206 answer to `Range: bytes=start-` ends; _Restart when its Content-Range is not that range of the
    file the .part was started from."""
    header = response.headers.get("Content-Range", "")
    found = CONTENT_RANGE.fullmatch(header.strip())
    if not found or int(found[1]) != start or (found[3] != "*" and int(found[2]) + 1 != int(found[3])):
        raise _Restart(f"the server answered the resume at byte {start} with Content-Range {header!r}")
    total = None if found[3] == "*" else int(found[3])
    if total is not None and state.get("total") not in (None, total):
        raise _Restart(f"the file on the server now has {total} bytes, not the {state['total']} of the .part")
    return int(found[2]) + 1


def _copy(response, first: bytes, part: Path, start: int, total: int | None, name: str) -> bool:
    """Append the response body to `part`; False when the connection broke off (what arrived is kept)."""
    with open(part, "ab" if start else "wb") as out, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                         desc=name, disable=None) as bar:
        chunk = first
        while chunk:
            out.write(chunk)
            bar.update(len(chunk))
            try:
                chunk = response.read(CHUNK)
            except (OSError, HTTPException):
                return False
    return True


def _transfer(name: str, url: str, part: Path) -> tuple[int, bool]:
    """Fetch `url` into `part`, resuming what is there; (the byte it resumed at, whether the server announced where
    the file ends). A UserError when the transfer stopped or the server sent something else than the archive."""
    start = part.stat().st_size if part.is_file() else 0
    state = _read_resume_state(part) if start else {}
    response = _open(url, start, state.get("etag") or state.get("last_modified"))
    if response is None:
        return start, True
    with response:
        if response.status == 206:
            end = _resumed_end(response, start, state)
        else:  # the whole file: the first request, a file changed since the .part began, or no Range support
            start, length = 0, response.headers.get("Content-Length")
            end = int(length) if length and length.isdigit() else None
            etag = response.headers.get("ETag")
            state = {"total": end, "last_modified": response.headers.get("Last-Modified"),
                     "etag": etag if etag and not etag.startswith("W/") else None}  # If-Range takes strong ones only
        try:
            first = response.read(CHUNK)
        except (OSError, HTTPException) as exc:
            raise UserError(f"connection to {url} broke off ({exc}): run the same command again") from None
        what = None if start else describe_non_archive(first)
        if what:
            raise UserError(f"{url} served {what} instead of the archive: {MIRROR_FIX}")
        with written_atomically(_resume_state_path(part)) as tmp:
            tmp.write_text(json.dumps(state))
        complete = _copy(response, first, part, start, end, name)
    size = part.stat().st_size
    if end is not None and size > end:
        _discard_part(part)
        raise UserError(f"{url}: received {_size(size)}, more than the {_size(end)} announced; the partial file "
                        f"was deleted: run the same command again")
    if not complete or (end is not None and size < end):
        of_total = f" of {_size(end)}" if end is not None else ""
        raise UserError(f"{url}: transfer stopped at {_size(size)}{of_total}, kept in {part.name}: run the same "
                        f"command again to resume")
    return start, end is not None


def _fetch_checked(name: str, url: str, part: Path) -> tuple[int, str | None]:
    """Transfer into `part` until it reads through as a whole archive; (resumed-at byte, why it started over)."""
    restarted = None
    while True:
        try:
            start, length_known = _transfer(name, url, part)
            try:
                read_archive(part)
            except BadArchive as fault:
                if fault.resumable and not length_known:
                    raise UserError(f"{url}: the connection closed at {_size(part.stat().st_size)} without telling "
                                    f"the length, and the archive {fault}; kept in {part.name}: run the same "
                                    f"command again to resume") from None
                if start == 0:
                    _discard_part(part)
                    raise UserError(f"{url} served an archive that {fault}; {part.name} was deleted: try again "
                                    f"later, or {ANOTHER_MIRROR}") from None
                raise _Restart(f"the resumed file {fault}") from None
            return start, restarted
        except _Restart as why:
            if restarted is not None:
                _discard_part(part)
                raise UserError(f"{url}: {why}, again after starting over: try again later, or "
                                f"{ANOTHER_MIRROR}") from None
            restarted = str(why)
            _discard_part(part)


def _check_existing(target: Path, url: str, expected: str | None) -> tuple[str, str]:
    """(sha256, how it was checked) of a NAME.tar.gz already there; BadArchive when it is not the right file."""
    recorded = read_manifest(target)
    size = target.stat().st_size
    if recorded and size != recorded[1]:
        raise BadArchive(f"has {size} bytes but {manifest_path(target).name} records {recorded[1]}",
                         resumable=size < recorded[1])
    digest = _sha256(target)
    if recorded and digest != recorded[0]:
        raise BadArchive(f"has sha256 {digest}, not the {recorded[0]} recorded in {manifest_path(target).name}")
    if expected and digest != expected:
        raise BadArchive(f"has sha256 {digest}, not the pinned {expected}", resumable=True)
    if recorded:
        return digest, f"matches {manifest_path(target).name}"
    read_archive(target)  # from before manifests, or put here by hand
    write_manifest(target, digest, size, url)
    return digest, f"read through, {manifest_path(target).name} written"


def download(name: str, url: str, data_dir: Path, expected_sha256: str | None = None) -> str:
    """Fetch archive `name` into `data_dir`; the summary line, or a UserError saying what went wrong and the fix."""
    try:
        return _download(name, url, data_dir, expected_sha256)
    except OSError as exc:  # the network's errors are UserErrors already: this is the local disk
        raise UserError(f"cannot write {name}.tar.gz into {data_dir} ({exc}): free disk space or fix its "
                        f"permissions, then run the same command again") from None


def _download(name: str, url: str, data_dir: Path, expected_sha256: str | None) -> str:
    target = data_dir / f"{name}.tar.gz"
    part = target.with_name(target.name + ".part")
    expected = expected_sha256.lower() if expected_sha256 else None
    replaced = ""
    if target.is_file():
        try:
            digest, how = _check_existing(target, url, expected)
            return f"{name}: already complete ({_size(target.stat().st_size)}, sha256 {digest}, {how}), skipped"
        except BadArchive as fault:
            manifest_path(target).unlink(missing_ok=True)
            _discard_part(part)
            if fault.resumable:  # a correct start, or the file a wrong pin was given for: kept as the .part
                target.replace(part)
            else:
                target.unlink()
            replaced = f"; the existing {target.name} {fault}: {'resumed' if fault.resumable else 'deleted'}"
    data_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        start, restarted = _fetch_checked(name, url, part)
    except UserError as exc:
        raise UserError(f"{exc}{replaced}") from None
    digest, size = _sha256(part), part.stat().st_size
    if expected and digest != expected:
        raise UserError(f"{part} has sha256 {digest}, not the pinned {expected}; it is kept as {part.name}: correct "
                        f"the checksum (--sha256 / --checksums) and run again, or if the checksum is right, delete "
                        f"{part.name} and download from another mirror")
    write_manifest(target, digest, size, url)
    part.replace(target)
    _resume_state_path(part).unlink(missing_ok=True)
    resumed = f", resumed at {_size(start)}" if start else ""
    again = f", started over ({restarted})" if restarted else ""
    return (f"{name}: downloaded {_size(size)} in {time.monotonic() - began:.1f}s{resumed}{again}{replaced}, "
            f"sha256 {digest} -> {target}")


# ---- Unpack -------------------------------------------------------------------------------------------------------

def _shown(name: str) -> str:
    """A member or link name for an error line: quoted, long ones cut in the middle."""
    return repr(name if len(name) <= 80 else f"{name[:40]}...{name[-30:]}")


def _member_path(archive: Path, member: tarfile.TarInfo) -> PurePosixPath | None:
    """Where `member` goes, relative to the extraction folder (None for the archive's own '.' entry); a UserError
    for anything but a plain file or directory at a relative path that stays inside."""
    parts = [part for part in member.name.split("/") if part not in ("", ".")]
    reason = None
    if member.issym():
        reason = f"is a symbolic link (to {_shown(member.linkname)})"
    elif member.islnk():
        reason = f"is a hard link (to {_shown(member.linkname)})"
    elif member.ischr() or member.isblk():
        reason = "is a device file"
    elif member.isfifo():
        reason = "is a FIFO"
    elif not (member.isreg() or member.isdir()):
        reason = f"has the unsupported tar type {member.type!r}"
    elif member.name.startswith("/"):
        reason = "has an absolute path"
    elif ".." in parts:
        reason = "has a '..' component"
    elif not parts and member.isreg():
        reason = "is a file without a name"
    if reason:
        raise UserError(f"{archive.name}: refused, nothing extracted: member {_shown(member.name)} {reason}; the "
                        f"MeLa archives hold only plain files and directories at relative paths: delete "
                        f"{archive.name} and download it again{_download_hint(archive.name)}")
    return PurePosixPath(*parts) if parts else None


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Every member is safe to write, and no path is both a file and a directory."""
    files, directories = set(), set()
    for member in members:
        path = _member_path(archive, member)
        if path is not None:
            (files if member.isreg() else directories).add(path)
            directories.update(path.parents[:-1])
    clash = sorted(files & directories)
    if clash:
        raise UserError(f"{archive.name}: refused, nothing extracted: {str(clash[0])!r} is both a file and a "
                        f"directory in the archive: delete {archive.name} and download it again")


def _extract(archive: Path, folder: Path) -> None:
    """Write the members into the new, empty `folder` (each checked again: these are the bytes being written)."""
    with _open_tar(archive) as (tar, _):
        for member in tar:
            path = _member_path(archive, member)
            if path is None:
                continue
            target = folder.joinpath(*path.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: never write through a link (the folder holds none; this keeps it so)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
            with tar.extractfile(member) as source, open(os.open(target, flags, 0o600), "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
            os.chmod(target, 0o755 if member.mode & 0o100 else 0o644)
            os.utime(target, (member.mtime, member.mtime))


def _moves(archive: Path, folder: Path, data_dir: Path) -> list[tuple[Path, Path]]:
    """The moves that put the extracted tree into `data_dir`: a new entry moves whole, an existing directory is
    merged into, a file already there with the same bytes stays; any other clash refuses the archive."""
    moves = []

    def plan(source: Path, destination: Path) -> None:
        if not os.path.lexists(destination):
            moves.append((source, destination))
        elif source.is_dir() and destination.is_dir():
            for child in sorted(source.iterdir()):
                plan(child, destination / child.name)
        elif not (source.is_file() and destination.is_file() and filecmp.cmp(source, destination, shallow=False)):
            raise UserError(f"{archive.name}: refused, nothing extracted: {destination} already exists and differs "
                            f"from the archive's {source.relative_to(folder)}: move it away and run again")

    for entry in sorted(folder.iterdir()):
        plan(entry, data_dir / entry.name)
    return moves


def unpack(archive: Path, data_dir: Path) -> str:
    """Extract `archive` into `data_dir` once; the summary line, or a UserError (unsafe, damaged, clashing)."""
    marker = data_dir / f".{archive.name}.unpacked"
    if marker.is_file():
        return f"{archive.name}: already unpacked (delete {marker.name} to unpack it again)"
    try:
        members = read_archive(archive)
    except BadArchive as fault:
        raise UserError(f"{archive} {fault}: delete it and download it again{_download_hint(archive.name)}") \
            from None
    except OSError as exc:
        raise UserError(f"cannot read {archive} ({exc}): check its permissions") from None
    _check_members(archive, members)
    for stale in data_dir.glob(f".{glob.escape(archive.name)}.*.unpacking"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".unpacking", dir=data_dir))
    try:
        try:
            _extract(archive, folder)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UserError(f"{archive} {_damage(exc)}: delete it and download it again"
                            f"{_download_hint(archive.name)}") from None
        except OSError as exc:
            raise UserError(f"cannot write into {data_dir} ({exc}): free disk space or fix its permissions, then "
                            f"run again; nothing was kept") from None
        created = ", ".join(f"{top.name}{'/' if top.is_dir() else ''}"
                            f"{' (existed)' if os.path.lexists(data_dir / top.name) else ''}"
                            for top in sorted(folder.iterdir()))
        for source, destination in _moves(archive, folder, data_dir):
            shutil.move(source, destination)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    marker.write_text("".join(f"{m.name}\n" for m in members))
    files = [m for m in members if m.isreg()]
    return f"{archive.name}: {len(files)} files, {_size(sum(m.size for m in files))} -> created {created or 'nothing'}"
