"""Housekeeping commands: ``spaces`` (the built-in search spaces) and ``cache`` (the folder of
cached calibrated layer variants)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("spaces", help="list the built-in search spaces")
    s.set_defaults(func=run_spaces)

    k = subparsers.add_parser("cache", help="show (and prune) the folder of cached calibrated layer variants")
    k.add_argument("--dir", default=None, help="variant folder (default $AUTOCOMP_CACHE/variants)")
    k.add_argument("--max-gb", type=float, default=None, metavar="GB",
                   help="delete least recently used variants until the folder holds at most GB gigabytes")
    k.set_defaults(func=run_cache)


def run_spaces(args: argparse.Namespace) -> int:
    from autocomp import api

    for space in api.builtin_spaces():
        print(f"{space.name:<10} {space.description}")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.errors import StorageError

    if args.max_gb is not None and args.max_gb < 0:
        raise StorageError(f"--max-gb must be >= 0, got {args.max_gb:g}")
    usage = api.variant_cache_usage(args.dir, None if args.max_gb is None else int(args.max_gb * 1e9))
    if not usage.exists:
        print(f"{usage.folder}: no variant cache yet")
        return 0
    print(f"{usage.folder}: {usage.variants} variants, {usage.bytes / 1e9:.3f} GB")
    if args.max_gb is not None:
        print(f"removed {usage.removed} least recently used variants ({usage.freed_bytes / 1e9:.3f} GB)")
    return 0
