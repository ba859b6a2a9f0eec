"""``autocomp search`` (run or resume a study) and ``autocomp worker`` (join one and run its trials)."""

from __future__ import annotations

import argparse
import sys

from autocomp.cli import options
from autocomp.cli.printing import export_hint, fmt_metrics, print_front, print_outcome, stderr


def add_parser(subparsers) -> None:
    _add_search(subparsers)
    _add_worker(subparsers)


def _add_search(subparsers) -> None:
    s = subparsers.add_parser("search", help="run or resume a multi-objective compression search")
    s.add_argument("--model", default="gemma3-270m", help="bundled name, model folder, .gguf file or hub id (default: gemma3-270m)")
    s.add_argument("--data", default="wikitext2", help="wikitext2 or a local .txt/.raw/.jsonl file (default: wikitext2)")
    s.add_argument("--calib-data", help="calibration text if not the data's validation split / second half")
    s.add_argument("--space", default="mixed", help="search-space YAML file or built-in name (default: mixed)")
    s.add_argument("--trials", type=int, required=True, help="number of completed trials the study should hold")
    options.add_study(s, required=False)
    options.add_budgets(s)
    s.add_argument("--objectives", default="perplexity,size_mb",
                   help="comma-separated: perplexity|kl, size_mb, latency_ms, memory_mb (default perplexity,size_mb)")
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
    options.add_variant_cache(s, help="folder for calibrated layer variants shared by runs and workers "
                                      "(default $AUTOCOMP_CACHE/variants; 'none' for memory only)")
    s.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder / hub")
    options.add_no_progress(s)
    options.add_latency(s)
    options.add_backend(s)
    options.add_validation(s, in_search=True)
    s.set_defaults(func=run_search)


def _add_worker(subparsers) -> None:
    w = subparsers.add_parser("worker", help="join an existing study and run its trials (Optuna's distributed mode: "
                                             "start any number, on any machine that reaches the storage)")
    options.add_study(w, required=True)
    w.add_argument("--trials", type=int, default=None,
                   help="finished trials the study should hold (default: what its search asked for)")
    options.add_variant_cache(w, help="as for search")
    options.add_no_progress(w)
    w.set_defaults(func=run_worker)


def study_spec(args: argparse.Namespace):
    """The :class:`~autocomp.config.spec.StudySpec` of the search flags. The cheap checks come first,
    before any model is loaded or any study touched: storage URL, budgets, space file, data files,
    model source, latency device."""
    from autocomp.config.objectives import Budgets
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.inputs.data import WindowSpec, validate_data_ref
    from autocomp.inputs.models import resolve_model_source
    from autocomp.store.urls import validate_url

    if args.storage:
        validate_url(args.storage)
    budgets = options.budgets(args, Budgets())
    space = SearchSpace.load(args.space)
    validate_data_ref(args.data)
    if args.calib_data:
        validate_data_ref(args.calib_data)
    resolve_model_source(args.model)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    latency = options.latency_spec(args, budgets, objectives)
    if latency is not None:
        latency.check_device()
    return StudySpec(
        model=args.model, space=space, data=args.data, calib_data=args.calib_data,
        eval_windows=WindowSpec(args.eval_windows, args.eval_seq_len),
        calib_windows=WindowSpec(args.calib_windows, args.calib_seq_len, args.seed),
        objectives=objectives, latency=latency,
        budgets=budgets, sampler=args.sampler, seed=args.seed, kl_topk=args.kl_topk, bos=args.bos,
        staged_windows=args.staged_windows, calibration_mode=args.calibration_mode,
        sensitivity={None: False, "output": True}.get(args.sensitivity, args.sensitivity),
        pin_sensitive=args.pin_sensitive,
        trust_remote_code=args.trust_remote_code,
    )


def run_search(args: argparse.Namespace) -> int:
    """Search (or only prepare the study), print the front, then validate it and print the
    recommendation (by held-out figures unless ``--no-validate``)."""
    from autocomp import api
    from autocomp.cli.read import show_recommendation
    from autocomp.store.urls import mask_url

    spec = study_spec(args)
    storage, study_name = api.study_location(spec, args.storage, args.study_name)
    validation = None if args.no_validate else options.validation_config(args)  # bad input fails here, early
    ray = options.ray_config(args)
    if args.prepare_only:
        api.prepare(spec, args.trials, storage, study_name, cache_bytes=args.cache_mb << 20,
                    cache_dir=args.variant_cache, echo=stderr)
        print(f"study {study_name!r} is ready for {args.trials} trials; start workers with:\n"
              f"  autocomp worker --storage {mask_url(storage)} --study-name {study_name}")
        return 0
    outcome = api.search(spec, args.trials, storage, study_name, progress=not args.no_progress,
                         cache_bytes=args.cache_mb << 20, cache_dir=args.variant_cache, echo=stderr, ray=ray)
    print_outcome(outcome)
    print_front(api.pareto(storage, study_name), json_out=False)
    if validation is not None and outcome.completed:
        api.validate(storage, study_name, validation, progress=not args.no_progress, echo=stderr)
        return show_recommendation(storage, study_name, None, "auto", validation.acc_budgets, "auto", False,
                                   with_export_hint=True)
    best = api.recommend(storage, study_name)
    if best is not None:
        print(f"\nrecommended: trial {best.trial}  {fmt_metrics(best.metrics)}")
        print(export_hint(storage, study_name, best.trial))
    else:
        print("\nno configuration meets the budgets yet")
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Run the study's trials until it holds its target; then say how to validate and choose."""
    from autocomp import api
    from autocomp.store.urls import mask_url

    outcome = api.worker(args.storage, args.study_name, args.trials, progress=not args.no_progress,
                         cache_bytes=args.cache_mb << 20, cache_dir=args.variant_cache, echo=stderr)
    print_outcome(outcome)
    where = f"--storage {mask_url(args.storage)} --study-name {args.study_name}"
    print(f"the study is complete; validate its front and choose: autocomp validate {where}; "
          f"autocomp recommend {where}", file=sys.stderr)
    return 0
