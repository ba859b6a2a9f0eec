"""Argument groups shared by several commands, and the typed configs they parse into.

Each ``add_*`` registers one group on a sub-parser; the matching parser (:func:`budgets`,
:func:`latency_spec`, :func:`validation_config`, :func:`ray_config`) turns the parsed namespace into
the config the API takes, raising a named error (exit 2) for a value argparse cannot check.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence


def add_study(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--storage", required=required, help="Optuna storage URL, e.g. sqlite:///results/S/study.db")
    p.add_argument("--study-name", required=required, help="study name inside the storage")


def add_budgets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets (constraints)")
    g.add_argument("--max-ppl-increase", type=float, metavar="PCT", help="at most PCT %% more perplexity than dense")
    g.add_argument("--max-size-mb", type=float, metavar="MB", help="at most MB megabytes (10^6 bytes)")
    g.add_argument("--max-kl", type=float, metavar="NATS", help="at most this KL to the dense model per token")
    g.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="at most MS milliseconds per generated token (or per prompt with --latency-metric prefill), "
                        "measured on the deployed model with real kernels")
    g.add_argument("--max-memory-mb", type=float, metavar="MB", help="at most MB megabytes of peak memory while running")


def budgets(args: argparse.Namespace, default: Any = None):
    """The :class:`~autocomp.config.objectives.Budgets` given by :func:`add_budgets`' flags, or
    ``default`` when none is given."""
    from autocomp.config.objectives import Budgets

    values = (args.max_ppl_increase, args.max_size_mb, args.max_kl, args.max_latency_ms, args.max_memory_mb)
    if all(v is None for v in values):
        return default
    return Budgets(*values)


def add_export_format(p: argparse.ArgumentParser) -> None:
    """``--format`` (a registered export format), ``--target``, ``--dtype`` and ``--variant-cache`` of
    export/compress."""
    from autocomp.exporters import DEFAULT_FORMAT, available_formats, get_format

    formats = available_formats()
    p.add_argument("--format", default=None, choices=formats,
                   help="; ".join(f"{name}: {get_format(name).description}" for name in formats)
                   + f" (default: the study's deploy_target's format, else {DEFAULT_FORMAT})")
    targets = sorted({t for name in formats for t in get_format(name).targets})
    p.add_argument("--target", default=None, choices=targets,
                   help="refuse, before writing, what this serving engine cannot load (with the format that checks it: "
                        + "; ".join(f"{name}: {', '.join(get_format(name).targets)}" for name in formats
                                    if get_format(name).targets) + ")")
    p.add_argument("--variant-cache", default=None, metavar="DIR",
                   help="folder of calibrated layer variants to read and fill (default: the one searches use, so an "
                        "export after a search reuses its variants; 'none': memory only)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the tensors kept in floating point (default float16; float32 only where "
                        "the format allows it)")


def add_latency(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency measurement (used by --max-latency-ms, --max-memory-mb and the "
                             "latency_ms / memory_mb objectives)")
    g.add_argument("--latency-engine", default="torch", choices=["torch", "llamacpp"],
                   help="what runs the timed model: torch with autocomp's kernels (default), or llama.cpp on the "
                        "GGUF file each candidate exports to (spaces with deploy_target llamacpp; needs the "
                        "llamacpp extra)")
    g.add_argument("--latency-device", default="cpu", choices=["cpu", "cuda"], help="device to measure on (default cpu)")
    g.add_argument("--latency-threads", type=int, default=0, metavar="N", help="threads (default 0: all cores)")
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


def latency_spec(args: argparse.Namespace, budgets, objectives: Sequence[str]):
    """The :class:`~autocomp.latency.spec.LatencySpec` of :func:`add_latency`' flags when anything asks
    for latency (a budget or an objective), else None."""
    from autocomp.config.objectives import LATENCY_OBJECTIVES
    from autocomp.latency.spec import LatencySpec

    wanted = (budgets is not None and budgets.needs_latency) or any(o in LATENCY_OBJECTIVES for o in objectives)
    if not wanted:
        return None
    return LatencySpec(device=args.latency_device, threads=args.latency_threads, dtype=args.latency_dtype,
                       batch=args.latency_batch, prompt_len=args.latency_prompt_len, new_tokens=args.latency_new_tokens,
                       repeats=args.latency_repeats, metric=args.latency_metric, dynamic_int8=args.dynamic_int8,
                       engine=args.latency_engine)


def add_validation(p: argparse.ArgumentParser, in_search: bool) -> None:
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


def validation_config(args: argparse.Namespace, trials: tuple[int, ...] | None = None):
    """The :class:`~autocomp.validation.runner.ValidationConfig` of :func:`add_validation`' flags.
    Raises DataError / TaskError for a bad value, an unknown task, or an accuracy budget on a task
    that ``--tasks`` does not run (so a typo fails before a search, not after)."""
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
        check_tasks(tasks, args.task_path)
    acc = parse_acc_budgets(args.max_acc_drop)
    unmeasured = sorted(set(acc) - set(tasks))
    if unmeasured:
        raise DataError(f"--max-acc-drop names task(s) {', '.join(unmeasured)} that --tasks does not run; "
                        f"add them to --tasks")
    return ValidationConfig(heldout_windows=args.heldout_windows, extra=parse_extra(args.extra),
                            extra_windows=args.extra_windows, tasks=tasks, task_paths=tuple(args.task_path),
                            task_limit=args.task_limit, acc_budgets=acc, trials=trials, replicates=args.bootstrap,
                            level=args.level, seed=0)


def add_backend(p: argparse.ArgumentParser) -> None:
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


def ray_config(args: argparse.Namespace):
    """The :class:`~autocomp.study.ray_backend.RayConfig` of :func:`add_backend`' flags, or None for
    the local backend. Raises ClusterError for Ray options without ``--backend ray``, and for
    ``--backend ray`` with ``--prepare-only``."""
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


def add_variant_cache(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--cache-mb", type=int, default=2048, help="memory for cached compressed layers (default 2048)")
    p.add_argument("--variant-cache", default=None, metavar="DIR", help=help)


def add_no_progress(p: argparse.ArgumentParser, help: str | None = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)
