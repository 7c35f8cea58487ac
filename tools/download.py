"""Fetch and unpack the data sets (the Makefile's download_*, unpack_datasets and download_cifar* targets).

    python -m tools.download [--data-dir DIR] download [--mirror URL] [--sha256 NAME=HEX]... [--checksums FILE]
                                                       NAME... (or: all)
    python -m tools.download [--data-dir DIR] unpack
    python -m tools.download [--data-dir DIR] cifar100 | cifar10

DIR defaults to $WORKSPACE/metaL_data. download: the MeLa archives (dataset/downloads.py: the original figshare
links, or <mirror>/NAME.tar.gz with --mirror or $METALABEL_MIRROR), each read through and checked before it is
kept, an interrupted transfer resumed; one summary line per archive. unpack: every archive in DIR, once, each
member checked before anything is written; one line per archive. cifar100 / cifar10: the CIFAR archive with
torchvision (md5-checked) into DIR. Exit status 1 if anything failed (docs/data_downloads.md).
"""
import argparse
import os
import sys
from functools import partial
from pathlib import Path

from dataset.downloads import (ARCHIVE_SUFFIXES, MIRROR_VARIABLE, archive_names, archive_url, download,
                               pinned_checksums, unpack)
from engine.errors import UserError
from engine.workspace import data_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.download", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $WORKSPACE/metaL_data")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download the MeLa archives (names, or all)")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--mirror", default=os.environ.get(MIRROR_VARIABLE) or None,
                       help=f"base address serving <name>.tar.gz (default: ${MIRROR_VARIABLE}, else the originals)")
    fetch.add_argument("--sha256", action="append", default=[], metavar="NAME=HEX",
                       help="the archive must have this sha256 (repeatable)")
    fetch.add_argument("--checksums", type=Path, default=None, metavar="FILE",
                       help="sha256sum-style file of '<sha256>  <name>.tar.gz' lines the archives must match")
    commands.add_parser("unpack", help="extract every archive in the data directory once")
    commands.add_parser("cifar100", help="CIFAR-100 with torchvision (md5-checked)")
    commands.add_parser("cifar10", help="CIFAR-10 with torchvision (md5-checked)")
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or data_root()).expanduser().resolve()
    try:
        if args.command == "download":
            names = archive_names(args.names)
            pins = pinned_checksums(args.sha256, args.checksums)
            jobs = [(name, partial(download, name, archive_url(name, args.mirror), data_dir, pins.get(name)))
                    for name in names]
        elif args.command == "unpack":
            if not data_dir.is_dir():
                raise UserError(f"{data_dir} does not exist: run `make download_all` first")
            archives = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
            if not archives:
                raise UserError(f"no archives ({', '.join(ARCHIVE_SUFFIXES)}) in {data_dir}: run `make download_all`")
            jobs = [(archive.name, partial(unpack, archive, data_dir)) for archive in archives]
        else:
            from dataset import cifar100

            print(f"ready: {cifar100.download(data_dir, cifar10=args.command == 'cifar10')}")
            return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for label, job in jobs:  # one line each; a failure does not stop the others
        try:
            print(job(), flush=True)
        except UserError as exc:
            failed += 1
            print(f"{label}: FAILED: {exc}", flush=True)
    if failed:
        print(f"error: {failed} of {len(jobs)} failed (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
