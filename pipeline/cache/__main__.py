"""``python -m pipeline.cache {info,verify} CACHE``."""

from __future__ import annotations

import argparse
import sys

from pipeline.cache.check import info_lines, verify
from pipeline.cache.directory import open_cache
from pipeline.cache.location import redact
from pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.cache",
        description="Inspect a preprocessed Zarr cache. CACHE is a keyed cache directory, "
        "or a cache root holding exactly one.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("info", "cases, cropped shapes, label voxel counts, size on disk"),
        ("verify", "read every case fully and check arrays against their attributes"),
    ):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("cache", metavar="CACHE")
    args = p.parse_args(argv)
    try:
        cache = open_cache(args.cache)
    except PipelineError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    if args.command == "info":
        print("\n".join(info_lines(cache)))
        return 0
    report = verify(cache)
    for cid, problems in report.items():
        for problem in problems:
            print(f"BAD {cid}: {problem}")
    print(f"verified {len(cache.case_ids)} cases: {len(cache.case_ids) - len(report)} ok, {len(report)} bad")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main())
