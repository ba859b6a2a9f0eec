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

from autocomp._version import __version__
from autocomp.errors import AutocompError

EXIT_NOTHING_FEASIBLE = 3


def _add_budgets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets (constraints)")
    g.add_argument("--max-ppl-increase", type=float, metavar="PCT", help="at most PCT %% more perplexity than dense")
    g.add_argument("--max-size-mb", type=float, metavar="MB", help="at most MB megabytes (10^6 bytes)")
    g.add_argument("--max-kl", type=float, metavar="NATS", help="at most this KL to the dense model per token")
    g.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="at most MS milliseconds per generated token (or per prompt with --latency-metric prefill), "
                        "measured on the deployed model with real kernels")
    g.add_argument("--max-memory-mb", type=float, metavar="MB", help="at most MB megabytes of peak memory while running")


def _add_export_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="packed", choices=["packed", "float"],
                   help="packed (default): low-bit codes, scales and sparse metadata in one safetensors file, bytes "
                        "on disk = accounted size (autocomp loads it); float: dequantized float32 weights that plain "
                        "from_pretrained loads")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="storage dtype of the packed format's 16-bit tensors (default float16)")


def _add_latency(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency measurement (used by --max-latency-ms, --max-memory-mb and the "
                             "latency_ms / memory_mb objectives)")
    g.add_argument("--latency-device", default="cpu", choices=["cpu", "cuda"], help="device to measure on (default cpu)")
    g.add_argument("--latency-threads", type=int, default=0, metavar="N", help="torch threads (default 0: all cores)")
    g.add_argument("--latency-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="activation and dense-weight dtype of the deployed model (default float32)")
    g.add_argument("--latency-batch", type=int, default=1, metavar="B", help="sequences at once (default 1)")
    g.add_argument("--latency-prompt-len", type=int, default=128, metavar="T", help="prompt tokens (default 128)")
    g.add_argument("--latency-new-tokens", type=int, default=16, metavar="T", help="decoded tokens timed (default 16)")
    g.add_argument("--latency-repeats", type=int, default=5, metavar="R", help="timed repeats, median taken (default 5)")
    g.add_argument("--latency-metric", default="decode", choices=["decode", "prefill"],
                   help="what latency_ms is: decode ms per token (default) or prefill ms per prompt")
    g.add_argument("--dynamic-int8", action="store_true",
                   help="run 8-bit per-channel layers with int8 activations (fbgemm; approximate, CPU only)")


def _latency_spec(args: argparse.Namespace, budgets, objectives: Sequence[str]):
    """The LatencySpec when anything asks for latency (a budget or an objective), else None."""
    from autocomp.latency.spec import LatencySpec
    from autocomp.config.objectives import LATENCY_OBJECTIVES

    wanted = (budgets is not None and budgets.needs_latency) or any(o in LATENCY_OBJECTIVES for o in objectives)
    if not wanted:
        return None
    return LatencySpec(device=args.latency_device, threads=args.latency_threads, dtype=args.latency_dtype,
                       batch=args.latency_batch, prompt_len=args.latency_prompt_len, new_tokens=args.latency_new_tokens,
                       repeats=args.latency_repeats, metric=args.latency_metric, dynamic_int8=args.dynamic_int8)


def _add_study(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--storage", required=required, help="Optuna storage URL, e.g. sqlite:///results/S/study.db")
    p.add_argument("--study-name", required=required, help="study name inside the storage")


def _add_validation(p: argparse.ArgumentParser, in_search: bool) -> None:
    g = p.add_argument_group("validation (re-scoring the front on data the search never saw)")
    if in_search:
        g.add_argument("--no-validate", action="store_true",
                       help="skip re-scoring the final front on held-out windows after the search")
    g.add_argument("--heldout-windows", type=int, metavar="N",
                   help="held-out windows right after the searched ones (default: as many as searched)")
    g.add_argument("--extra", action="append", default=[], metavar="NAME=SOURCE",
                   help="an extra evaluation set (second domain): pycode, wikitext2 or a .txt/.jsonl file; repeatable")
    g.add_argument("--extra-windows", type=int, metavar="N", help="windows per extra set (default: as held out)")
    g.add_argument("--tasks", default="", metavar="T1,T2",
                   help="lm-eval tasks: the built-in wikitext_lastword, local YAML tasks (--task-path) or hub tasks")
    g.add_argument("--task-path", action="append", default=[], metavar="DIR", help="folder of local lm-eval task YAML files")
    g.add_argument("--task-limit", type=int, metavar="N", help="examples per task (default: all)")
    g.add_argument("--max-acc-drop", action="append", default=[], metavar="TASK=PTS",
                   help="accuracy budget: at most PTS points of TASK accuracy lost; repeatable")
    g.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap replicates (default 1000)")
    g.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")


def _add_backend(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where trials run (see README: cluster search)")
    g.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: this process; ray: Ray actors, one model each (default: local)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster: auto (the running one), HOST:PORT or ray://HOST:10001 (default: start a local runtime)")
    g.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="Ray workers, i.e. trials at once (default: as many as the cluster fits)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs (torch threads) per Ray worker")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G", help="GPUs reserved per Ray worker")
    g.add_argument("--max-worker-restarts", type=int, default=4, metavar="K",
                   help="Ray workers started in place of lost ones, in all (default 4)")
    g.add_argument("--prepare-only", action="store_true",
                   help="create the study (dense figures, baselines) and stop: then start 'autocomp worker' processes")


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
    s.add_argument("--cache-mb", type=int, default=2048, help="memory for cached compressed layers (default 2048)")
    s.add_argument("--variant-cache", default=None, metavar="DIR",
                   help="folder for calibrated layer variants shared by runs and workers "
                        "(default $AUTOCOMP_CACHE/variants; 'none' for memory only)")
    s.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder / hub")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_latency(s)
    _add_backend(s)
    _add_validation(s, in_search=True)

    w = sub.add_parser("worker", help="join an existing study and run its trials (Optuna's distributed mode: "
                                      "start any number, on any machine that reaches the storage)")
    _add_study(w, required=True)
    w.add_argument("--trials", type=int, default=None,
                   help="finished trials the study should hold (default: what its search asked for)")
    w.add_argument("--cache-mb", type=int, default=2048, help="memory for cached compressed layers (default 2048)")
    w.add_argument("--variant-cache", default=None, metavar="DIR", help="as for search")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("pareto", help="print the feasible Pareto set of a study")
    _add_study(p, required=True)
    _add_budgets(p)
    p.add_argument("--json", action="store_true", help="print JSON (a list of {trial, metrics, plan, ...})")

    r = sub.add_parser("recommend", help="choose one configuration under (new) budgets from stored trials")
    _add_study(r, required=True)
    _add_budgets(r)
    r.add_argument("--prefer", default="auto", choices=["auto", "size", "quality", "knee"])
    r.add_argument("--by", default="auto", choices=["auto", "heldout", "search"],
                   help="choose by held-out figures (needs autocomp validate) or by search figures; "
                        "auto: held-out when the study was validated")
    r.add_argument("--max-acc-drop", action="append", default=[], metavar="TASK=PTS",
                   help="accuracy budget on a validated task; repeatable")
    r.add_argument("--json", action="store_true")

    v = sub.add_parser("validate", help="re-score a study's front on held-out windows, extra domains and lm-eval tasks")
    _add_study(v, required=True)
    _add_budgets(v)
    _add_validation(v, in_search=False)
    v.add_argument("--trials", default=None, metavar="N,M", help="trials to validate (default: the fronts and baselines)")
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--json", action="store_true", help="print the stored validation as JSON")

    rp = sub.add_parser("report", help="write an HTML report (plotly), PNG figures and CSV/JSON data of a study")
    _add_study(rp, required=True)
    rp.add_argument("--out", required=True, help="output folder")

    d = sub.add_parser("dashboard", help="open optuna-dashboard on a study storage")
    d.add_argument("--storage", required=True)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)

    c = sub.add_parser("compress", help="apply a plan JSON to a model and save it")
    c.add_argument("--model", required=True)
    c.add_argument("--plan", required=True, help="plan JSON file")
    c.add_argument("--out", required=True, help="output folder (must be new or empty)")
    c.add_argument("--trust-remote-code", action="store_true")
    _add_export_format(c)

    m = sub.add_parser("measure", help="re-measure the latency of a latency study's front end to end (resumable)")
    _add_study(m, required=True)
    e = sub.add_parser("export", help="save the compressed model of one trial")
    _add_study(e, required=True)
    e.add_argument("--trial", type=int, required=True)
    e.add_argument("--out", required=True)
    _add_export_format(e)

    sub.add_parser("spaces", help="list the built-in search spaces")

    k = sub.add_parser("cache", help="show (and prune) the folder of cached calibrated layer variants")
    k.add_argument("--dir", default=None, help="variant folder (default $AUTOCOMP_CACHE/variants)")
    k.add_argument("--max-gb", type=float, default=None, metavar="GB",
                   help="delete least recently used variants until the folder holds at most GB gigabytes")
    return parser


def _budgets(args: argparse.Namespace, default: Any = None):
    from autocomp.config.objectives import Budgets

    values = (args.max_ppl_increase, args.max_size_mb, args.max_kl, args.max_latency_ms, args.max_memory_mb)
    if all(v is None for v in values):
        return default
    return Budgets(*values)


def _cmd_search(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.inputs.data import WindowSpec, validate_data_ref
    from autocomp.inputs.models import resolve_model_source
    from autocomp.config.objectives import Budgets
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.store.urls import mask_url, validate_url

    # cheap checks first, before any model is loaded or any study touched
    if args.storage:
        validate_url(args.storage)
    budgets = _budgets(args, Budgets())
    space = SearchSpace.load(args.space)
    validate_data_ref(args.data)
    if args.calib_data:
        validate_data_ref(args.calib_data)
    resolve_model_source(args.model)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    latency = _latency_spec(args, budgets, objectives)
    if latency is not None:
        latency.check_device()
    spec = StudySpec(
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
    study_name = args.study_name or api.default_study_name(spec)
    from autocomp.store.urls import default_storage_url

    storage = args.storage or default_storage_url(study_name)
    validation = None if args.no_validate else _validation_config(args)  # bad validation input fails here, early
    ray_config = _ray_config(args)
    if args.prepare_only:
        api.prepare(spec, args.trials, storage, study_name, cache_bytes=args.cache_mb << 20,
                    cache_dir=args.variant_cache, echo=_stderr)
        print(f"study {study_name!r} is ready for {args.trials} trials; start workers with:\n"
              f"  autocomp worker --storage {mask_url(storage)} --study-name {study_name}")
        return 0
    outcome = api.search(spec, args.trials, storage, study_name, progress=not args.no_progress,
                         cache_bytes=args.cache_mb << 20, cache_dir=args.variant_cache, echo=_stderr, ray=ray_config)
    _print_outcome(outcome)
    _print_front(api.pareto(storage, study_name), json_out=False)
    if validation is not None and outcome.completed:
        api.validate(storage, study_name, validation, progress=not args.no_progress, echo=_stderr)
        return _print_recommendation(storage, study_name, None, "auto", validation.acc_budgets, "auto", False,
                                     export_hint=True)
    best = api.recommend(storage, study_name)
    if best is not None:
        print(f"\nrecommended: trial {best.trial}  {_fmt_metrics(best.metrics)}")
        print(f"  export it: autocomp export --storage {mask_url(storage)} --study-name {study_name} --trial {best.trial} --out OUT_DIR")
    else:
        print("\nno configuration meets the budgets yet")
    return 0


def _ray_config(args: argparse.Namespace):
    """The Ray settings, or None for the local backend (Ray options without --backend ray are refused)."""
    from autocomp.errors import ClusterError

    if args.backend != "ray":
        given = [flag for flag, value in (("--address", args.address), ("--concurrency", args.concurrency),
                                          ("--gpus-per-trial", args.gpus_per_trial or None)) if value is not None]
        if given:
            raise ClusterError(f"{', '.join(given)} only apply to --backend ray")
        return None
    from autocomp.study.ray_backend import RayConfig

    if args.prepare_only:
        raise ClusterError("--prepare-only creates the study for 'autocomp worker' processes; leave out --backend ray")
    return RayConfig(address=args.address, concurrency=args.concurrency or 0, cpus_per_trial=args.cpus_per_trial,
                     gpus_per_trial=args.gpus_per_trial, max_worker_restarts=args.max_worker_restarts)


def _print_outcome(outcome) -> None:
    reused = f", {outcome.reused} reused an identical configuration's figures" if outcome.reused else ""
    print(f"{outcome.completed} completed trials ({outcome.ran} run now, {outcome.pruned} of them stopped early, "
          f"{outcome.failed} failed now{reused})", file=sys.stderr)


def _cmd_worker(args: argparse.Namespace) -> int:
    from autocomp import api

    from autocomp.store.urls import mask_url

    outcome = api.worker(args.storage, args.study_name, args.trials, progress=not args.no_progress,
                         cache_bytes=args.cache_mb << 20, cache_dir=args.variant_cache, echo=_stderr)
    _print_outcome(outcome)
    where = f"--storage {mask_url(args.storage)} --study-name {args.study_name}"
    print(f"the study is complete; validate its front and choose: autocomp validate {where}; "
          f"autocomp recommend {where}", file=sys.stderr)
    return 0


def _validation_config(args: argparse.Namespace, trials: tuple[int, ...] | None = None):
    from autocomp.errors import DataError
    from autocomp.validation.lmeval import check_tasks, parse_acc_budgets
    from autocomp.validation.runner import ValidationConfig
    from autocomp.validation.sets import parse_extra

    for flag, value in (("--heldout-windows", args.heldout_windows), ("--extra-windows", args.extra_windows),
                        ("--task-limit", args.task_limit)):
        if value is not None and value < (2 if "windows" in flag else 1):
            raise DataError(f"{flag} must be at least {2 if 'windows' in flag else 1}, got {value}")
    if args.bootstrap < 100:
        raise DataError(f"--bootstrap needs at least 100 replicates, got {args.bootstrap}")
    if not 0.5 <= args.level < 1:
        raise DataError(f"--level must be in [0.5, 1), got {args.level}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if tasks:
        check_tasks(tasks, args.task_path)  # a typo fails now, not after the search
    acc = parse_acc_budgets(args.max_acc_drop)
    unmeasured = sorted(set(acc) - set(tasks))
    if unmeasured:
        raise DataError(f"--max-acc-drop names task(s) {', '.join(unmeasured)} that --tasks does not run; "
                        f"add them to --tasks")
    return ValidationConfig(heldout_windows=args.heldout_windows, extra=parse_extra(args.extra),
                            extra_windows=args.extra_windows, tasks=tasks, task_paths=tuple(args.task_path),
                            task_limit=args.task_limit, acc_budgets=acc, trials=trials, replicates=args.bootstrap,
                            level=args.level, seed=0)


def _ci(figures: dict[str, Any]) -> str:
    low, high = figures["ppl_increase_ci"]
    return f"{figures['ppl_increase_pct']:+.2f}% [{low:+.2f}, {high:+.2f}]"


def _print_validation(validation: dict[str, Any], judged: dict[int, dict[str, Any]], records) -> None:
    sets = list(validation["sets"])
    level = round(100 * validation["level"])
    print("\nvalidated on: " + "; ".join(f"{n} = {validation['sets'][n]['label']}" for n in sets))
    tasks = sorted(validation["dense"].get("tasks", {}))
    head = f"{'trial':>5}  {'size MB':>8}  " + "  ".join(f"{n + ' +ppl% [' + str(level) + '% CI]':>30}" for n in sets)
    head += "".join(f"  {t + ' acc (drop)':>24}" for t in tasks) + "  verdict"
    print(head)
    by_number = {r.trial: r for r in records.records}
    for key in sorted(validation["trials"], key=int):
        entry, number = validation["trials"][key], int(key)
        if number not in by_number:
            continue
        v = judged.get(number, {})
        status = "FLAGGED" if v.get("flagged") else "uncertain" if v.get("uncertain") else \
            "ok" if v.get("heldout_feasible") else "infeasible"
        if v.get("heldout_feasible") and not v.get("search_feasible"):
            status += " held out (the search figures broke the budgets)"
        verdict = status + (": " + "; ".join(v["reasons"]) if v.get("reasons") else "")
        line = f"{number:>5}  {entry['size_mb']:>8.2f}  " + "  ".join(f"{_ci(entry['sets'][n]):>30}" for n in sets)
        for t in tasks:
            r = entry.get("tasks", {}).get(t)
            cell = "-" if r is None else f"{100 * r['value']:.1f} ({r['drop_points']:+.1f})"
            line += f"  {cell:>24}"
        print(line + "  " + verdict)


def _print_recommendation(storage: str, study_name: str, budgets, prefer: str, acc_budgets: dict[str, float] | None,
                          by: str, json_out: bool, export_hint: bool = False) -> int:
    """Print (or JSON) the recommendation; by held-out figures when validated. ``budgets`` and
    ``acc_budgets`` None: the study's own and those stored with its validation."""
    from autocomp import api
    from autocomp.store.records import load_records
    from autocomp.store.urls import mask_url
    from autocomp.validation.runner import load_validation
    from autocomp.validation.verdicts import recommend_validated

    from autocomp.errors import StudyError

    validation = load_validation(storage, study_name) if by != "search" else None
    if by == "heldout" and validation is None:
        raise StudyError(f"study {study_name!r} has no validation yet; run autocomp validate --storage "
                         f"{mask_url(storage)} --study-name {study_name} first, or use --by search")
    if acc_budgets and validation is None:
        raise StudyError("--max-acc-drop needs a validated study (autocomp validate --tasks ...)")
    if validation is None:
        best = api.recommend(storage, study_name, budgets, prefer)
        judged, records = {}, None
    else:
        records = load_records(storage, study_name)
        best, judged = recommend_validated(records, validation, budgets, acc_budgets, prefer)
    if json_out:  # the trial record as without validation, plus its validation and every verdict
        out = None if best is None else best.to_dict()
        if validation is not None:
            out = out or {"trial": None}
            if best is not None:
                out["validation"] = validation["trials"][str(best.trial)]
            out.update(by="heldout", verdicts={str(k): v for k, v in judged.items()})
        print(json.dumps(out, indent=2))
        return 0 if best is not None else EXIT_NOTHING_FEASIBLE
    if validation is not None:
        _print_validation(validation, judged, records)
        flagged = [n for n, v in judged.items() if v["flagged"]]
        if flagged:
            print(f"\nFLAGGED: trial(s) {', '.join(map(str, flagged))} met the budgets on the search windows but not "
                  f"on held-out data; they are not recommended")
    if best is None:
        where = "on held-out data" if validation is not None else ""
        print(f"autocomp: no stored configuration meets these budgets {where}; relax them or run more trials",
              file=sys.stderr)
        return EXIT_NOTHING_FEASIBLE
    print(f"\nrecommended: trial {best.trial}  {_fmt_metrics(best.metrics)}" + ("  (search figures)" if validation else ""))
    if validation is not None:
        entry = validation["trials"][str(best.trial)]
        level = round(100 * validation["level"])
        for name, figures in entry["sets"].items():
            print(f"  {name:>8}: perplexity {figures['perplexity']:.3f}, {_ci(figures)} vs dense ({level}% CI)"
                  + (f", KL {figures['kl']:.4f} [{figures['kl_ci'][0]:.4f}, {figures['kl_ci'][1]:.4f}]"
                     if figures.get("kl") is not None else ""))
        for task, r in entry.get("tasks", {}).items():
            dense = validation["dense"]["tasks"][task]
            spread = (f"[{r['drop_ci'][0]:+.2f}, {r['drop_ci'][1]:+.2f}] ({level}% CI)" if "drop_ci" in r
                      else f"(stderr {100 * (r.get('stderr') or 0):.2f})")
            print(f"  {task}: {r['metric']} {100 * r['value']:.2f} (dense {100 * dense['value']:.2f}, "
                  f"{r['drop_points']:+.2f} points lost {spread})")
        if judged[best.trial]["uncertain"]:
            print("  note: " + "; ".join(judged[best.trial]["reasons"]))
    if export_hint:
        print(f"  export it: autocomp export --storage {mask_url(storage)} --study-name {study_name} --trial {best.trial} --out OUT_DIR")
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _fmt_metrics(m: dict[str, Any]) -> str:
    kl = m.get("kl")
    return (f"ppl {m['perplexity']:.3f} ({m.get('ppl_increase_pct', 0):+.2f}%)  "
            + (f"kl {kl:.4f}  " if kl is not None else "")
            + f"size {m['size_mb']:.2f} MB (x{m.get('compression_ratio', 1):.2f})  "
            f"bits {m.get('avg_bits', 16):.2f}  sparsity {m.get('avg_sparsity', 0):.3f}"
            + (f"  latency {m['latency_ms']:.3g} ms{'' if m.get('latency_remeasured') else ' (search)'}  "
               f"memory {m.get('memory_mb', 0):.4g} MB" if "latency_ms" in m else ""))


def _print_front(front: Sequence[Any], json_out: bool) -> None:
    from autocomp.students.spec import describe_student

    if json_out:
        print(json.dumps([r.to_dict() for r in front], indent=2))
        return
    print(f"feasible Pareto set: {len(front)} configuration(s)")
    speed = any("latency_ms" in r.metrics for r in front)
    print(f"{'trial':>5}  {'perplexity':>10}  {'+ppl%':>7}  {'kl':>7}  {'size MB':>8}  {'ratio':>5}  {'bits':>5}  {'sparsity':>8}  "
          + (f"{'ms':>8}  {'mem MB':>7}  " if speed else "") + "note")
    for r in front:
        m = r.metrics
        kl = m.get("kl")
        latency = (f"{m.get('latency_ms', float('nan')):>8.3g}{'' if m.get('latency_remeasured') else '*'}"
                   f"{' ' if m.get('latency_remeasured') else ''} {m.get('memory_mb', float('nan')):>7.0f}  " if speed else "")
        print(f"{r.trial:>5}  {m['perplexity']:>10.3f}  {m.get('ppl_increase_pct', 0):>7.2f}  "
              f"{(f'{kl:.4f}' if kl is not None else '-'):>7}  {m['size_mb']:>8.2f}  {m.get('compression_ratio', 1):>5.2f}  "
              f"{m.get('avg_bits', 16):>5.2f}  {m.get('avg_sparsity', 0):>8.3f}  " + latency
              + "; ".join(x for x in (describe_student(r.plan), r.uniform or "") if x))
    if speed and not all(r.metrics.get("latency_remeasured") for r in front):
        print("* latency from the search, not re-measured yet (autocomp measure re-measures the front)")


def _cmd_pareto(args: argparse.Namespace) -> int:
    from autocomp import api

    _print_front(api.pareto(args.storage, args.study_name, _budgets(args)), args.json)
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from autocomp.validation.lmeval import parse_acc_budgets

    return _print_recommendation(args.storage, args.study_name, _budgets(args), args.prefer,
                                 parse_acc_budgets(args.max_acc_drop) or None, args.by, args.json)


def _cmd_validate(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.errors import StudyError

    try:
        trials = None if args.trials is None else tuple(int(t) for t in args.trials.split(",") if t.strip())
    except ValueError:
        raise StudyError(f"--trials takes comma-separated trial numbers, got {args.trials!r}") from None
    config = _validation_config(args, trials)
    validation = api.validate(args.storage, args.study_name, config, _budgets(args), progress=not args.no_progress,
                              echo=_stderr)
    if args.json:
        print(json.dumps(validation, indent=2))
        return 0
    return _print_recommendation(args.storage, args.study_name, _budgets(args), "auto", config.acc_budgets, "heldout",
                                 False, export_hint=True)


def _cmd_report(args: argparse.Namespace) -> int:
    from autocomp import api

    paths = api.report(args.storage, args.study_name, args.out)
    for kind, path in paths.items():
        print(f"{kind:>14}: {path}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from autocomp.reporting.dashboard import run_dashboard

    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    run_dashboard(args.storage, args.host, args.port)
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from autocomp import api
    from autocomp.config.plan import CompressionPlan

    plan = CompressionPlan.load(args.plan)
    out = api.compress(args.model, plan, args.out, trust_remote_code=args.trust_remote_code, format=args.format,
                       dtype=args.dtype)
    _print_saved(out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from autocomp import api

    out = api.export(args.storage, args.study_name, args.trial, args.out, format=args.format, dtype=args.dtype)
    _print_saved(out)
    return 0


def _print_saved(out) -> None:
    info = json.loads((out / "autocomp.json").read_text())
    if info.get("format") == "packed":
        print(f"saved {out} (packed: {info['bytes_on_disk'] / 1e6:.2f} MB on disk, accounted "
              f"{info['accounted_size_mb']:.2f} MB, x{info['compression_ratio']:.2f} smaller than the original)")
    else:
        print(f"saved {out} (float weights; accounted {info['accounted_size_mb']:.2f} MB when packed)")


def _cmd_measure(args: argparse.Namespace) -> int:
    from autocomp import api

    api.remeasure(args.storage, args.study_name, echo=_stderr)
    _print_front(api.pareto(args.storage, args.study_name), json_out=False)
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from autocomp.config.space import BUILTIN_DIR, SearchSpace

    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        space = SearchSpace.load(path)
        print(f"{space.name:<10} {space.description}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autocomp.pipeline.variants import LayerVariantCache
    from autocomp.errors import StorageError
    from autocomp.inputs.models import cache_root

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


COMMANDS = {"search": _cmd_search, "worker": _cmd_worker, "pareto": _cmd_pareto, "recommend": _cmd_recommend,
            "validate": _cmd_validate, "report": _cmd_report, "dashboard": _cmd_dashboard, "compress": _cmd_compress,
            "export": _cmd_export, "measure": _cmd_measure, "spaces": _cmd_spaces, "cache": _cmd_cache}


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
