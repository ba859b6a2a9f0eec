"""Commands that build or time compressed models: ``compress`` (a plan file onto a model),
``export`` (one trial of a study) and ``measure`` (re-time a latency study's front)."""

from __future__ import annotations

import argparse

from autocomp.cli import options
from autocomp.cli.printing import print_front, print_saved, stderr


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("compress", help="apply a plan JSON to a model and save it")
    c.add_argument("--model", required=True)
    c.add_argument("--plan", required=True, help="plan JSON file")
    c.add_argument("--out", required=True, help="output folder (must be new or empty)")
    c.add_argument("--trust-remote-code", action="store_true")
    options.add_export_format(c)
    c.set_defaults(func=run_compress)

    m = subparsers.add_parser("measure", help="re-measure the latency of a latency study's front end to end (resumable)")
    options.add_study(m, required=True)
    m.set_defaults(func=run_measure)

    e = subparsers.add_parser("export", help="save the compressed model of one trial")
    options.add_study(e, required=True)
    e.add_argument("--trial", type=int, required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code (needed for a study created with --trust-remote-code)")
    options.add_export_format(e)
    e.set_defaults(func=run_export)


def run_compress(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.config.plan import CompressionPlan

    plan = CompressionPlan.load(args.plan)
    out = api.compress(args.model, plan, args.out, trust_remote_code=args.trust_remote_code, format=args.format,
                       dtype=args.dtype, cache_dir=args.variant_cache, target=args.target)
    print_saved(out)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from autocomp import api

    out = api.export(args.storage, args.study_name, args.trial, args.out, format=args.format, dtype=args.dtype,
                     cache_dir=args.variant_cache, trust_remote_code=args.trust_remote_code, target=args.target)
    print_saved(out)
    return 0


def run_measure(args: argparse.Namespace) -> int:
    """Re-measure the front (progress on stderr), then print it with the new figures."""
    from autocomp import api

    api.remeasure(args.storage, args.study_name, echo=stderr)
    print_front(api.pareto(args.storage, args.study_name), json_out=False)
    return 0
