"""Download and unpack the MeLa archives (the Makefile's download_* and unpack_datasets targets).

    python -m dataset.downloads download [--data-dir DIR] [--mirror URL] NAME... (or: all)
    python -m dataset.downloads unpack [--data-dir DIR]

DIR defaults to $WORKSPACE/metaL_data. The addresses are `ARCHIVES` (the original figshare links, spec §3); with
a mirror (`--mirror`, or $METALABEL_MIRROR) archive NAME is fetched from <mirror>/NAME.tar.gz instead.

download: into NAME.tar.gz.part, renamed to NAME.tar.gz only once complete; a .part left by an interrupted
transfer is resumed with an HTTP Range request; a complete archive is skipped; an HTML page served instead of
the archive is recognised and not kept. One summary line per archive; exit status 1 if any failed.
unpack: every archive in DIR, once (the marker .NAME.unpacked records its entries), after checking that no entry
would land outside DIR (absolute paths, '..', links pointing out, device files): such an archive is refused
whole, nothing of it extracted. One line per archive says what it created.
"""
import argparse
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from dataset.safe_pickle import looks_like_html
from engine.errors import UserError
from engine.workspace import data_root

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
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CHUNK = 1 << 20
TIMEOUT_S = 60


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.2f} GB"


def archive_names(requested: list[str]) -> list[str]:
    """Archive names as the user typed them (any case, as in the make targets), or `all`."""
    if requested == ["all"]:
        return list(ARCHIVES)
    by_lower = {name.lower(): name for name in ARCHIVES}
    unknown = [name for name in requested if name.lower() not in by_lower]
    if unknown or not requested:
        raise UserError(f"unknown archive {' '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join(ARCHIVES)} or all")
    return [by_lower[name.lower()] for name in requested]


def archive_url(name: str, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{name}.tar.gz" if mirror else ARCHIVES[name]


def _open(url: str, start: int):
    """The response for bytes `start`.. of `url`, or None when the server says there is nothing past `start`."""
    request = urllib.request.Request(url, headers={"User-Agent": "metalabel-downloads"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # range not satisfiable: the .part may already hold the whole file
            total = exc.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == start:
                return None
            raise UserError(f"server refused to resume at {_size(start)} (HTTP 416): delete the .part file "
                            f"and run again") from None
        raise UserError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        raise UserError(f"cannot reach {url} ({getattr(exc, 'reason', exc)})") from None


def _copy(response, first: bytes, part: Path, start: int, total: int | None, name: str) -> bool:
    """Append the response body to `part`; False when the connection broke off (what arrived is kept)."""
    with open(part, "ab" if start else "wb") as out, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                                         desc=name, disable=None) as bar:
        chunk = first
        try:
            while chunk:
                out.write(chunk)
                bar.update(len(chunk))
                chunk = response.read(CHUNK)
        except (OSError, HTTPException):
            return False
    return True


def download(name: str, url: str, data_dir: Path) -> str:
    """Fetch archive `name` into `data_dir`; the summary line, or a UserError saying what went wrong."""
    target = data_dir / f"{name}.tar.gz"
    part = target.with_name(target.name + ".part")
    if target.is_file():
        with open(target, "rb") as handle:
            if looks_like_html(handle.read(512)):
                raise UserError(f"{target} is an HTML page, not an archive: delete it and run again")
        return f"{name}: already complete ({_size(target.stat().st_size)}), skipped"
    data_dir.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.is_file() else 0
    began = time.monotonic()
    response = _open(url, start)
    if response is not None:
        with response:
            if response.status == 206:  # resuming: Content-Range is "bytes start-end/total"
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                total = int(total) if total.isdigit() else None
            else:  # the whole file, also when the server ignored the Range header
                start = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            try:
                first = response.read(CHUNK)
            except (OSError, HTTPException) as exc:
                raise UserError(f"connection to {url} broke off ({exc}): run again") from None
            if looks_like_html(first) or response.headers.get_content_type() == "text/html":
                raise UserError(f"{url} served an HTML page instead of the archive (a login, error or expired-link "
                                f"page): check the address, or set {MIRROR_VARIABLE}")
            complete = _copy(response, first, part, start, total, name)
        size = part.stat().st_size
        if total is not None and size > total:
            part.unlink()
            raise UserError(f"received {_size(size)}, more than the {_size(total)} announced: the partial file was "
                            f"deleted, run again")
        if not complete or (total is not None and size < total):
            of_total = f" of {_size(total)}" if total is not None else ""
            raise UserError(f"transfer stopped at {_size(size)}{of_total}, kept in {part.name}: run the same "
                            f"command again to resume")
    size = part.stat().st_size
    part.replace(target)
    resumed = f", resumed at {_size(start)}" if start else ""
    return f"{name}: downloaded {_size(size)} in {time.monotonic() - began:.1f}s{resumed} -> {target}"


def _top_level(member_name: str) -> str:
    parts = PurePosixPath(member_name).parts
    return parts[1] if parts[0] == "." and len(parts) > 1 else parts[0]


def unpack(archive: Path, data_dir: Path) -> str:
    """Extract `archive` into `data_dir` once; the summary line, or a UserError (unsafe, corrupt)."""
    marker = data_dir / f".{archive.name}.unpacked"
    if marker.is_file():
        return f"{archive.name}: already unpacked (delete {marker.name} to unpack it again)"
    with open(archive, "rb") as handle:
        if looks_like_html(handle.read(512)):
            raise UserError(f"{archive} is an HTML page, not an archive: delete it and download it again")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                try:
                    if member.name.startswith("/"):  # the data filter would strip the slash; refuse it instead
                        raise tarfile.AbsolutePathError(member)
                    tarfile.data_filter(member, str(data_dir))
                except tarfile.FilterError as exc:
                    raise UserError(f"{archive.name}: refused, nothing extracted: {exc}") from None
            tops = sorted({_top_level(m.name) for m in members if m.name not in (".", "./")})
            existed = {top for top in tops if (data_dir / top).exists()}
            tar.extractall(data_dir, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UserError(f"{archive} is truncated or not a tar archive ({exc}): delete it and download it again") \
            from None
    marker.write_text("".join(f"{m.name}\n" for m in members))
    n_files = sum(m.isfile() for m in members)
    created = ", ".join(f"{top}{'/' if (data_dir / top).is_dir() else ''}{' (existed)' if top in existed else ''}"
                        for top in tops)
    return f"{archive.name}: {n_files} files, {_size(sum(m.size for m in members))} -> created {created or 'nothing'}"


def _run_each(items, action, label) -> int:
    """Apply `action` to every item, printing one line each; returns how many failed."""
    failed = 0
    for item in items:
        try:
            print(action(item), flush=True)
        except UserError as exc:
            failed += 1
            print(f"{label(item)}: FAILED: {exc}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $WORKSPACE/metaL_data")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download archives (names, or all)")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--mirror", default=os.environ.get(MIRROR_VARIABLE) or None,
                       help=f"base address serving <name>.tar.gz (default: ${MIRROR_VARIABLE}, else the originals)")
    commands.add_parser("unpack", help="extract every archive in the data directory once")
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or data_root()).expanduser().resolve()
    try:
        if args.command == "download":
            names = archive_names(args.names)
            failed = _run_each(names, lambda name: download(name, archive_url(name, args.mirror), data_dir), str)
            total = len(names)
        else:
            if not data_dir.is_dir():
                raise UserError(f"{data_dir} does not exist: run `make download_all` first")
            archives = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
            if not archives:
                raise UserError(f"no archives ({', '.join(ARCHIVE_SUFFIXES)}) in {data_dir}: run `make download_all`")
            failed = _run_each(archives, lambda archive: unpack(archive, data_dir), lambda archive: archive.name)
            total = len(archives)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if failed:
        print(f"error: {failed} of {total} failed (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
