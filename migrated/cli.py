"""Command line of migrated. Exit status: 0 success, 1 failure, 2 usage error."""
from __future__ import annotations

import argparse
import json
import sys

from migrated import __version__


def _bench(args: argparse.Namespace) -> int:
    from migrated import bench

    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = bench.run_core(args.size, args.repeat, progress=progress)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(bench.format_core(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrated",
        description="Live memory migration over TCP with XBZRLE page deltas.",
    )
    parser.add_argument("--version", action="version", version=f"migrated {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser(
        "bench",
        help="measure the data-plane core against memcmp/memcpy ceilings",
        description=(
            "Measure XBZRLE encode/decode, batch encode (cache + framing), batch apply and "
            "the dirty scan over a working set larger than the CPU caches. Every figure is "
            "MB/s of page data and a ratio to memcmp measured in the same run."
        ),
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    b.add_argument("--size", type=int, default=64, metavar="MIB", help="working set per buffer in MiB (default 64)")
    b.add_argument("--repeat", type=int, default=3, metavar="N", help="repetitions, best is kept (default 3)")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "size", 1) < 1 or getattr(args, "repeat", 1) < 1:
        print("migrated: --size and --repeat must be at least 1", file=sys.stderr)
        return 2
    return args.func(args)
