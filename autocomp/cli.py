"""Command line: parse arguments, build a StudySpec, call the API, map errors to exit codes.

Exit codes: 0 success; 2 a user error (named :class:`~autocomp.errors.AutocompError`, printed as one
line ``autocomp: error: ...``, no traceback); 3 ``recommend`` found nothing feasible; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from autocomp import __version__
from autocomp.errors import AutocompError

EXIT_NOTHING_FEASIBLE = 3


def _add_budgets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets (constraints)")
    g.add_argument("--max-ppl-increase", type=float, metavar="PCT", help="at most PCT %% more perplexity than dense")
    g.add_argument("--max-size-mb", type=float, metavar="MB", help="at most MB megabytes (10^6 bytes)")
    g.add_argument("--max-kl", type=float, metavar="NATS", help="at most this KL to the dense model per token")


def _add_study(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--storage", required=required, help="Optuna storage URL, e.g. sqlite:///results/S/study.db")
    p.add_argument("--study-name", required=required, help="study name inside the storage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autocomp", description="Automated compression search for causal LMs.")
    parser.add_argument("--version", action="version", version=f"autocomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run or resume a multi-objective compression search")
    s.add_argument("--model", default="gemma3-270m", help="bundled name, model folder, .gguf file or hub id (default: gemma3-270m)")
    s.add_argument("--data", default="wikitext2", help="wikitext2 or a local .txt/.raw/.jsonl file (default: wikitext2)")
    s.add_argument("--calib-data", help="calibration text if not the data's validation split / second half")
    s.add_argument("--space", default="mixed", help="search-space YAML file or built-in name (default: mixed)")
    s.add_argument("--trials", type=int, required=True, help="number of completed trials the study should hold")
    _add_study(s, required=False)
    _add_budgets(s)
    s.add_argument("--objectives", default="perplexity,size_mb", help="comma-separated: perplexity|kl, size_mb")
    s.add_argument("--sampler", default="nsga2", choices=["nsga2", "tpe", "evo"],
                   help="nsga2 (default), tpe, or evo: level-switch mutations of the feasible front (EvoPress), "
                        "best after --sensitivity seeding")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (default 16)")
    s.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default 512)")
    s.add_argument("--calib-windows", type=int, default=16, help="calibration windows (default 16)")
    s.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    s.add_argument("--bos", default="every", choices=["every", "first", "none"],
                   help="BOS at the start of every window (default), once before the stream, or never")
    s.add_argument("--kl-topk", type=int, default=128, help="dense top-k kept for the KL objective (default 128)")
    s.add_argument("--staged-windows", type=int, default=0, metavar="K",
                   help="staged evaluation: score K windows first and stop candidates that cannot reach the "
                        "feasible front or break a budget (default 0: off)")
    s.add_argument("--calibration-mode", default="dense", choices=["dense", "sequential"],
                   help="dense: statistics of the dense model, layer variants cached and stitched (default); "
                        "sequential: block by block on the compressed model's activations (exact, slower)")
    s.add_argument("--sensitivity", nargs="?", const="output", default=None, choices=["output", "fisher", "kl"],
                   help="measure every group's error at every choice first and seed trials with allocations "
                        "from it: 'output' (default; layer-output error, no forward pass), 'fisher' (predicted "
                        "KL to the dense model from one backward pass per calibration window) or 'kl' "
                        "(measured KL with only that group compressed; one forward pass per group and choice)")
    s.add_argument("--pin-sensitive", type=int, default=0, metavar="K",
                   help="with --sensitivity: fix the K most sensitive groups at their most accurate choice")
    s.add_argument("--cache-mb", type=int, default=2048, help="memory for cached compressed layers (default 2048)")
    s.add_argument("--variant-cache", default=None, metavar="DIR",
                   help="folder for calibrated layer variants shared by runs and workers "
                        "(default $AUTOCOMP_CACHE/variants; 'none' for memory only)")
    s.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder / hub")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("pareto", help="print the feasible Pareto set of a study")
    _add_study(p, required=True)
    _add_budgets(p)
    p.add_argument("--json", action="store_true", help="print JSON (a list of {trial, metrics, plan, ...})")

    r = sub.add_parser("recommend", help="choose one configuration under (new) budgets from stored trials")
    _add_study(r, required=True)
    _add_budgets(r)
    r.add_argument("--prefer", default="auto", choices=["auto", "size", "quality", "knee"])
    r.add_argument("--json", action="store_true")

    c = sub.add_parser("compress", help="apply a plan JSON to a model and save it")
    c.add_argument("--model", required=True)
    c.add_argument("--plan", required=True, help="plan JSON file")
    c.add_argument("--out", required=True, help="output folder (must be new or empty)")
    c.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser("export", help="save the compressed model of one trial")
    _add_study(e, required=True)
    e.add_argument("--trial", type=int, required=True)
    e.add_argument("--out", required=True)

    sub.add_parser("spaces", help="list the built-in search spaces")

    k = sub.add_parser("cache", help="show (and prune) the folder of cached calibrated layer variants")
    k.add_argument("--dir", default=None, help="variant folder (default $AUTOCOMP_CACHE/variants)")
    k.add_argument("--max-gb", type=float, default=None, metavar="GB",
                   help="delete least recently used variants until the folder holds at most GB gigabytes")
    return parser


def _budgets(args: argparse.Namespace, default: Any = None):
    from autocomp.objectives import Budgets

    if args.max_ppl_increase is None and args.max_size_mb is None and args.max_kl is None:
        return default
    return Budgets(args.max_ppl_increase, args.max_size_mb, args.max_kl)


def _cmd_search(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.data import WindowSpec, validate_data_ref
    from autocomp.models import resolve_model_source
    from autocomp.objectives import Budgets
    from autocomp.space import SearchSpace
    from autocomp.spec import StudySpec
    from autocomp.study.storage import mask_url, validate_url

    # cheap checks first, before any model is loaded or any study touched
    if args.storage:
        validate_url(args.storage)
    budgets = _budgets(args, Budgets())
    space = SearchSpace.load(args.space)
    validate_data_ref(args.data)
    if args.calib_data:
        validate_data_ref(args.calib_data)
    resolve_model_source(args.model)
    spec = StudySpec(
        model=args.model, space=space, data=args.data, calib_data=args.calib_data,
        eval_windows=WindowSpec(args.eval_windows, args.eval_seq_len),
        calib_windows=WindowSpec(args.calib_windows, args.calib_seq_len, args.seed),
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()),
        budgets=budgets, sampler=args.sampler, seed=args.seed, kl_topk=args.kl_topk, bos=args.bos,
        staged_windows=args.staged_windows, calibration_mode=args.calibration_mode,
        sensitivity={None: False, "output": True}.get(args.sensitivity, args.sensitivity),
        pin_sensitive=args.pin_sensitive,
        trust_remote_code=args.trust_remote_code,
    )
    study_name = args.study_name or api.default_study_name(spec)
    from autocomp.study.storage import default_storage_url

    storage = args.storage or default_storage_url(study_name)
    outcome = api.search(spec, args.trials, storage, study_name, progress=not args.no_progress,
                         cache_bytes=args.cache_mb << 20, cache_dir=args.variant_cache, echo=_stderr)
    print(f"{outcome.completed} completed trials ({outcome.ran} run now, {outcome.pruned} of them stopped early, "
          f"{outcome.failed} failed now)", file=sys.stderr)
    _print_front(api.pareto(storage, study_name), json_out=False)
    best = api.recommend(storage, study_name)
    if best is not None:
        print(f"\nrecommended: trial {best.trial}  {_fmt_metrics(best.metrics)}")
        print(f"  export it: autocomp export --storage {mask_url(storage)} --study-name {study_name} --trial {best.trial} --out OUT_DIR")
    else:
        print("\nno configuration meets the budgets yet")
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _fmt_metrics(m: dict[str, Any]) -> str:
    kl = m.get("kl")
    return (f"ppl {m['perplexity']:.3f} ({m.get('ppl_increase_pct', 0):+.2f}%)  "
            + (f"kl {kl:.4f}  " if kl is not None else "")
            + f"size {m['size_mb']:.2f} MB (x{m.get('compression_ratio', 1):.2f})  "
            f"bits {m.get('avg_bits', 16):.2f}  sparsity {m.get('avg_sparsity', 0):.3f}")


def _print_front(front: Sequence[Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps([r.to_dict() for r in front], indent=2))
        return
    print(f"feasible Pareto set: {len(front)} configuration(s)")
    print(f"{'trial':>5}  {'perplexity':>10}  {'+ppl%':>7}  {'kl':>7}  {'size MB':>8}  {'ratio':>5}  {'bits':>5}  {'sparsity':>8}  note")
    for r in front:
        m = r.metrics
        kl = m.get("kl")
        print(f"{r.trial:>5}  {m['perplexity']:>10.3f}  {m.get('ppl_increase_pct', 0):>7.2f}  "
              f"{(f'{kl:.4f}' if kl is not None else '-'):>7}  {m['size_mb']:>8.2f}  {m.get('compression_ratio', 1):>5.2f}  "
              f"{m.get('avg_bits', 16):>5.2f}  {m.get('avg_sparsity', 0):>8.3f}  {r.uniform or ''}")


def _cmd_pareto(args: argparse.Namespace) -> int:
    from autocomp import api

    _print_front(api.pareto(args.storage, args.study_name, _budgets(args)), args.json)
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from autocomp import api

    best = api.recommend(args.storage, args.study_name, _budgets(args), args.prefer)
    if best is None:
        msg = "no stored configuration meets these budgets; relax them or run more trials"
        print(json.dumps(None) if args.json else f"autocomp: {msg}", file=sys.stdout if args.json else sys.stderr)
        return EXIT_NOTHING_FEASIBLE
    if args.json:
        print(json.dumps(best.to_dict(), indent=2))
    else:
        print(f"trial {best.trial}: {_fmt_metrics(best.metrics)}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.plan import CompressionPlan

    plan = CompressionPlan.load(args.plan)
    out = api.compress(args.model, plan, args.out, trust_remote_code=args.trust_remote_code)
    print(f"saved {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from autocomp import api

    out = api.export(args.storage, args.study_name, args.trial, args.out)
    print(f"saved {out}")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from autocomp.space import BUILTIN_DIR, SearchSpace

    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        space = SearchSpace.load(path)
        print(f"{space.name:<10} {space.description}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autocomp.cache import LayerVariantCache
    from autocomp.errors import StorageError
    from autocomp.models import cache_root

    folder = Path(args.dir) if args.dir else cache_root() / "variants"
    if args.max_gb is not None and args.max_gb < 0:
        raise StorageError(f"--max-gb must be >= 0, got {args.max_gb:g}")
    if not folder.is_dir():
        if folder.exists():
            raise StorageError(f"{folder} is not a folder; pass --dir with the variant cache folder")
        print(f"{folder}: no variant cache yet")
        return 0
    cache = LayerVariantCache(directory=folder)
    entries = cache.disk_entries()
    print(f"{folder}: {len(entries)} variants, {sum(e[1] for e in entries) / 1e9:.3f} GB")
    if args.max_gb is not None:
        removed, freed = cache.prune_disk(int(args.max_gb * 1e9))
        print(f"removed {removed} least recently used variants ({freed / 1e9:.3f} GB)")
    return 0


COMMANDS = {"search": _cmd_search, "pareto": _cmd_pareto, "recommend": _cmd_recommend,
            "compress": _cmd_compress, "export": _cmd_export, "spaces": _cmd_spaces, "cache": _cmd_cache}


def main(argv: Sequence[str] | None = None) -> int:
    # quiet the libraries' own progress bars and advisories; autocomp draws its own trial bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (called in-process): the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AutocompError as exc:
        print(f"autocomp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autocomp: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `autocomp pareto --json | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
