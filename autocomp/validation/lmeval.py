"""Downstream tasks through EleutherAI's lm-evaluation-harness (lm-eval), on a model already in memory.

:func:`run_tasks` wraps a loaded (maybe compressed in place) Hugging Face causal LM in lm-eval's
``HFLM`` and calls lm-eval's own ``simple_evaluate``; the figures are lm-eval's, autocomp only picks
the primary accuracy-like metric of each task (``acc``, else ``acc_norm``, ``exact_match``, ``em``).

A task name is looked up in this order (later folders override earlier ones on a name clash):

1. autocomp's built-in tasks (:func:`builtin_task_names`), built offline into ``$AUTOCOMP_CACHE/tasks``;
2. lm-eval's registered tasks; their datasets come from the Hugging Face hub, so offline they fail
   unless the ``datasets`` cache already holds them;
3. local task folders given in ``include_paths`` (an lm-eval task YAML + its JSONL data), which win.

See ``docs/tasks.md`` for the CLI flags and how to write a local task. lm-eval is an optional
dependency (``pip install 'autocomp[lmeval]'``) and is imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp._imports import optional
from autocomp.errors import BudgetError, TaskError
from autocomp.validation.tasks import builtin_task_names, prepare_builtin_task

__all__ = ["TaskResult", "builtin_task_names", "prepare_builtin_task", "run_tasks", "check_tasks",
           "parse_acc_budgets", "PRIMARY_METRICS"]

PRIMARY_METRICS = ("acc", "acc_norm", "exact_match", "em")
BOOTSTRAP_ITERS = 100          # only bootstrapped metrics (perplexity) use it; acc's stderr is closed-form
HOW_TO_ADD = ("to add a task, write an lm-eval task YAML and a JSONL file in a folder and pass it with "
              "--task-path DIR (include_paths); see docs/tasks.md")


@dataclass(frozen=True)
class TaskResult:
    """One task's score: ``metric`` (``acc`` preferred) as a fraction in [0, 1], over ``n`` documents."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    extra: dict[str, float] = field(default_factory=dict)    # other numeric metrics, e.g. perplexity
    per_doc: tuple[float, ...] = ()    # the metric of each document, in document order (for paired intervals)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "value": self.value, "stderr": self.stderr,
                "n": self.n, "extra": dict(self.extra), "per_doc": list(self.per_doc)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        """Inverse of :meth:`to_dict`; raises TaskError naming the missing or malformed field."""
        try:
            stderr = data.get("stderr")
            return cls(task=str(data["task"]), metric=str(data["metric"]), value=float(data["value"]),
                       stderr=None if stderr is None else float(stderr), n=int(data["n"]),
                       extra={str(k): float(v) for k, v in (data.get("extra") or {}).items()},
                       per_doc=tuple(float(v) for v in data.get("per_doc") or ()))
        except KeyError as exc:
            raise TaskError(f"stored task result has no field {exc.args[0]!r}: {data!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise TaskError(f"stored task result is malformed ({exc}): {data!r}") from None


def parse_acc_budgets(items: Sequence[str]) -> dict[str, float]:
    """``["TASK=POINTS", ...]`` (the ``--max-acc-drop`` values) -> ``{task: points}``.

    ``POINTS`` is the most accuracy a compressed model may lose against the dense one, in percentage
    points (0 <= POINTS <= 100). Raises BudgetError for a malformed item or a task given twice.
    """
    budgets: dict[str, float] = {}
    for item in items:
        example = "expected TASK=POINTS, e.g. wikitext_lastword=2.0 (most accuracy lost, in percentage points)"
        if not isinstance(item, str) or item.count("=") != 1:
            raise BudgetError(f"--max-acc-drop {item!r}: {example}")
        task, _, raw = (part.strip() for part in item.partition("="))
        if not task:
            raise BudgetError(f"--max-acc-drop {item!r}: no task name before '='; {example}")
        try:
            points = float(raw)
        except ValueError:
            raise BudgetError(f"--max-acc-drop {item!r}: {raw!r} is not a number; {example}") from None
        if not math.isfinite(points) or not 0.0 <= points <= 100.0:
            raise BudgetError(f"--max-acc-drop {item!r}: the drop must be between 0 and 100 percentage points")
        if task in budgets:
            raise BudgetError(f"--max-acc-drop: task {task!r} is given twice")
        budgets[task] = points
    return budgets


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], include_paths: Sequence[str | Path] = (),
              limit: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, TaskResult]:
    """Evaluate ``model`` (a loaded HF causal LM) on lm-eval ``tasks``, zero-shot; returns ``{task: TaskResult}``.

    ``limit`` keeps the first ``limit`` documents of each task (all when None). The same model, tasks,
    limit, batch size and ``seed`` give the same figures (all of lm-eval's seeds are set from ``seed``;
    the caller's random states are restored afterwards); another batch size pads differently, which moves
    log-likelihoods by rounding only. The model is left in eval mode with its weights untouched;
    the tokenizer is not modified. Groups of tasks report their leaf tasks (and the group when lm-eval
    aggregates it).

    Raises DependencyError when lm-eval is not installed, and TaskError for an unknown task name, a
    task whose data cannot be loaded (a hub task offline), or a task without an accuracy-like metric.
    """
    names = _task_names(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TaskError(f"task limit must be a positive whole number of documents, not {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TaskError(f"batch size must be a positive whole number, not {batch_size!r}")
    _require_lm_eval()
    folders = _folders(names, include_paths)

    import torch
    from lm_eval import simple_evaluate

    with _quiet_lm_eval(), _caller_random_state():
        manager, loaded = _load_tasks(names, folders)
        try:
            with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):   # stdout is the CLI's, not lm-eval's
                lm = _wrap_model(model, tokenizer, batch_size)
                out = simple_evaluate(model=lm, tasks=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                                      log_samples=True, task_manager=manager, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        finally:
            model.eval()
    if out is None:
        raise TaskError("lm-eval returned no results (not the main process of a distributed launch?)")
    return _collect(out)


def check_tasks(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()) -> None:
    """Raise now what :func:`run_tasks` would raise for these names (before a long search, say), without
    loading a model or any dataset: DependencyError without lm-eval, TaskError for an unknown name or a
    missing task folder. Builds the built-in tasks asked for. Seconds when a name is one of lm-eval's own
    tasks (their index is read), instant for built-in and local tasks."""
    names = _task_names(tasks)
    _require_lm_eval()
    folders = _folders(names, include_paths)
    with _quiet_lm_eval():
        _task_manager(names, folders)


def _task_names(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names: list[str] = []
    for name in tasks:
        if not isinstance(name, str) or not name.strip():
            raise TaskError(f"a task name must be a non-empty string, not {name!r}")
        if name.strip() not in names:
            names.append(name.strip())
    if not names:
        raise TaskError(f"no task given; built-in tasks: {', '.join(builtin_task_names())}")
    return names


def _require_lm_eval() -> None:
    optional("lm_eval", "lm-eval tasks", "pip install 'autocomp[lmeval]'")
    # lm-eval's Hugging Face model wrapper needs its "hf" extra
    optional("accelerate", "lm-eval's Hugging Face models", "pip install 'autocomp[lmeval]' (it installs lm-eval[hf])")


def _include_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise TaskError(f"task path {folder} {what}; give a folder holding task YAML files")
    return folder.resolve()


def _unknown_message(unknown: list[str], known: list[str], builtin: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (f"unknown task {', '.join(parts)}; built-in tasks (offline): {', '.join(builtin)}; "
            f"lm-eval's registered tasks need network for their datasets; {HOW_TO_ADD}")


def _task_manager(names: list[str], folders: list[str], full: bool = False) -> tuple[Any, bool]:
    """(lm-eval TaskManager that knows every name, whether it indexes lm-eval's own tasks too).

    Indexing lm-eval's ~14k task YAMLs takes seconds, so names that the local folders define get an
    index of those folders alone. Raises TaskError for a name no index knows."""
    from lm_eval.tasks import TaskManager

    if folders and not full:
        local = TaskManager(include_path=folders, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local, False
    manager = TaskManager(include_path=folders or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        builtin = builtin_task_names()
        raise TaskError(_unknown_message(unknown, [*manager.all_tasks, *builtin], builtin))
    return manager, True


def _load_tasks(names: list[str], folders: list[str]) -> tuple[Any, list[Any]]:
    """(TaskManager, the Task / Group objects for ``names`` with their data loaded)."""
    manager, full = _task_manager(names, folders)
    try:
        return manager, [task for name in names for task in _load_task(manager, name, retry_on_key=not full)]
    except KeyError:                         # a local group or include names one of lm-eval's own tasks
        manager, _ = _task_manager(names, folders, full=True)
        return manager, [task for name in names for task in _load_task(manager, name)]


def _folders(names: list[str], include_paths: Sequence[str | Path]) -> list[str]:
    builtin = builtin_task_names()
    folders = [prepare_builtin_task(name) for name in names if name in builtin]
    return [str(f) for f in folders + [_include_folder(p) for p in include_paths]]


def _load_task(manager: Any, name: str, retry_on_key: bool = False) -> list[Any]:
    """The Task or Group object(s) for ``name``, datasets loaded; TaskError if that fails (offline hub).
    With ``retry_on_key`` a KeyError (a name missing from the index) is raised as it is, for a retry."""
    try:
        loaded = manager.load([name])
    except KeyError:
        if retry_on_key:
            raise
        raise TaskError(f"task {name!r} refers to a task lm-eval does not know; {HOW_TO_ADD}") from None
    except Exception as exc:  # a dataset that cannot be fetched or read, or a broken YAML: the task's problem
        detail = " ".join(str(exc).split())[:300]
        raise TaskError(
            f"task {name!r} could not be loaded ({type(exc).__name__}: {detail}). lm-eval's registered tasks "
            f"download their data from the Hugging Face hub, which needs network (or a local copy in the datasets "
            f"cache); offline, use a built-in task ({', '.join(builtin_task_names())}) or a local task; {HOW_TO_ADD}"
        ) from exc
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())      # a tag: its tasks


def _wrap_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around ``model`` without letting it re-tie weights (a compressed head may be untied)."""
    from lm_eval.models.huggingface import HFLM

    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)    # HFLM sets a pad token on the tokenizer it is given
    model.tie_weights = _no_tie                # instance attribute shadows the method during HFLM.__init__
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        del model.tie_weights


def _no_tie(*args: Any, **kwargs: Any) -> None:
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _collect(out: dict[str, Any]) -> dict[str, TaskResult]:
    n_samples = out.get("n-samples", {})
    subtasks = out.get("group_subtasks", {})

    def count(name: str) -> int:
        if name in n_samples:
            return int(n_samples[name].get("effective", n_samples[name].get("original", 0)))
        return sum(count(child) for child in subtasks.get(name, []))

    results: dict[str, TaskResult] = {}
    samples = out.get("samples") or {}
    for name, metrics in out.get("results", {}).items():
        result = _task_result(name, metrics, count(name), samples.get(name, ()))
        if result is None:
            if name in n_samples:           # a leaf task must have an accuracy; a group may just list children
                reported = sorted(k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k)
                raise TaskError(f"task {name!r} reports no accuracy-like metric ({', '.join(PRIMARY_METRICS)}); "
                                f"it reports: {', '.join(reported) or 'nothing'}")
            continue
        results[name] = result
    return results


def _task_result(name: str, metrics: dict[str, Any], n: int, samples: Sequence[dict[str, Any]] = ()) -> TaskResult | None:
    """Split lm-eval's ``{"metric,filter": value, "metric_stderr,filter": se}`` into a TaskResult; the
    logged ``samples`` give the primary metric per document (a group has none)."""
    values: dict[tuple[str, str], float] = {}
    stderrs: dict[tuple[str, str], float | None] = {}
    for key, raw in metrics.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue                         # "alias", "name", "sample_len"
        if metric.endswith("_stderr"):
            stderrs[(metric[: -len("_stderr")], filt)] = _number(raw)
        elif (value := _number(raw)) is not None:
            values[(metric, filt)] = value
    primary = None
    for metric in PRIMARY_METRICS:
        keys = [k for k in values if k[0] == metric]
        if keys:
            primary = (metric, "none") if (metric, "none") in keys else keys[0]
            break
    if primary is None:
        return None
    value = values[primary]
    if not 0.0 <= value <= 1.0:
        raise TaskError(f"task {name!r}: {primary[0]} = {value} is not a fraction in [0, 1]")
    extra = {(m if f == "none" else f"{m},{f}"): v for (m, f), v in values.items() if (m, f) != primary}
    docs = sorted((s for s in samples if s.get("filter", "none") == primary[1] and primary[0] in s),
                  key=lambda s: s["doc_id"])
    per_doc = tuple(float(s[primary[0]]) for s in docs)
    if per_doc and abs(sum(per_doc) / len(per_doc) - value) > 1e-9:  # not the figure lm-eval aggregated
        per_doc = ()
    return TaskResult(task=name, metric=primary[0], value=value, stderr=stderrs.get(primary), n=n, extra=extra,
                      per_doc=per_doc)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's info/warning logs off, single-process bootstrap, no datasets progress bars; all restored."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"     # lm-eval's bootstrap would start a process pool per metric
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _caller_random_state() -> Iterator[None]:
    """simple_evaluate seeds python, numpy and torch globally; give the caller its random states back."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
