"""The local backend: one process asks Optuna for trials, evaluates them, tells the results.

Resume is running the same command again:

* the study's spec hash must equal the new one (else :class:`StudyError` with the differences);
* trials left ``RUNNING`` by a process of this host that no longer exists (killed, crashed) are marked
  failed with that reason and their parameters re-enqueued, at most ``MAX_RETRIES`` times each;
* only the missing trials run: the target is ``n_trials`` *finished* trials (completed, or stopped
  early by staged evaluation, see :mod:`autocomp.study.staged`);
* a finished study returns at once without loading the model.

A trial that raises (a layer that cannot take its plan, out of memory, NaN) is recorded as failed
with its plan and traceback and the study goes on; ``MAX_CONSECUTIVE_FAILURES`` in a row stop it,
since then the configuration itself is broken. Ctrl-C marks the running trial failed, re-enqueues
it, and exits; the next run picks it up.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from autocomp import __version__
from autocomp.errors import AutocompError, BudgetError, StudyError
from autocomp.objectives import objective_values
from autocomp.plan import CompressionPlan
from autocomp.spec import StudySpec, spec_differences
from autocomp.study.staged import Screen, StagedConfig, TrialPruned
from autocomp.study.storage import mask_url, open_storage

MAX_RETRIES = 2
MAX_CONSECUTIVE_FAILURES = 5
SPEC_ATTR = "autocomp_spec"
HASH_ATTR = "autocomp_spec_hash"
DENSE_ATTR = "autocomp_dense"
BASELINES_ATTR = "autocomp_baselines_enqueued"
SENSITIVITY_ATTR = "autocomp_sensitivity"
PINNED_ATTR = "autocomp_pinned"


@dataclass
class SearchOutcome:
    study_name: str
    completed: int      # finished trials in the study: completed + stopped early
    ran: int
    failed: int
    pruned: int = 0     # stopped by staged evaluation in this run


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(spec: StudySpec, evaluator=None, pinned: Mapping[str, Any] | None = None, table=None):
    """NSGA-II (default), multivariate TPE or level-switch mutation (``evo``, needs the evaluator's
    targets), seeded. Budgets reach NSGA-II and TPE as per-trial constraints (``trial.set_constraint``),
    which they read from the stored trials; ``evo`` mutates the feasible front by the stored metrics."""
    optuna = _optuna()
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True)
    if spec.sampler == "evo" and evaluator is not None:
        from autocomp.study.evo import LevelSwitchSampler, choice_ladders, ladder_errors

        dense_ppl = evaluator.dense.perplexity

        def feasible(trial) -> bool:
            metrics = trial.user_attrs.get("metrics")
            return bool(metrics) and spec.budgets.feasible(metrics, dense_ppl)

        ladders = choice_ladders(spec.space, evaluator.targets, pinned)
        errors = ladder_errors(ladders, table) if table else None
        return LevelSwitchSampler(ladders, feasible, seed=spec.seed, errors=errors)
    return optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=16)


def load_existing(storage, study_name: str):
    """The study if it exists, else None."""
    optuna = _optuna()
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def check_spec(study, spec: StudySpec) -> None:
    stored_hash = study.user_attrs.get(HASH_ATTR)
    if stored_hash is None:
        raise StudyError(f"study {study.study_name!r} exists but was not created by autocomp; choose another --study-name")
    if stored_hash != spec.digest():
        raw = study.user_attrs.get(SPEC_ATTR, {})
        try:  # normalise: options added since the study was stored take their defaults
            stored = StudySpec.from_dict(raw).to_dict()
        except (KeyError, TypeError, AutocompError):  # a spec from an incompatible version: compare raw
            stored = raw
        diffs = spec_differences(stored, spec.to_dict())
        raise StudyError(
            f"study {study.study_name!r} exists with a different specification ({'; '.join(diffs[:4]) or 'hash differs'}); "
            "re-run with the same options to resume, or pick a new --study-name"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


UNCLAIMED_GRACE_S = 60


def _is_dead(t, host: str) -> str | None:
    """Why a RUNNING trial is known dead, or None. A trial that never got its owner recorded (its
    process died between asking for it and writing the owner) is dead after a grace period."""
    pid = t.user_attrs.get("pid")
    if pid is None:
        started = t.datetime_start
        if started is not None and (datetime.datetime.now() - started).total_seconds() > UNCLAIMED_GRACE_S:
            return f"no worker claimed the trial within {UNCLAIMED_GRACE_S} s of its start"
        return None
    if t.user_attrs.get("host") != host:
        return None  # another machine's worker: left to its heartbeat
    if int(pid) == os.getpid() or _pid_alive(int(pid)):
        return None
    return f"worker process {pid} died during the trial"


def _requeue(study, trial, retries: int) -> None:
    """Queue ``trial``'s configuration again: its queued (fixed) params if it was enqueued (a baseline,
    a seeded allocation), overlaid on whatever it had drawn; at most MAX_RETRIES times."""
    params = {**trial.params, **trial.system_attrs.get("fixed_params", {})}
    if retries > MAX_RETRIES or not params:
        return
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "seeded")}
    study.enqueue_trial(params, user_attrs={**attrs, "retries": retries, "retry_of": trial.number})


def recover_dead_trials(study) -> int:
    """Fail RUNNING trials known dead (see :func:`_is_dead`); re-enqueue their params. Returns the count."""
    optuna = _optuna()
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        reason = _is_dead(t, host)
        if reason is None:
            continue
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        _requeue(study, t, int(t.user_attrs.get("retries", 0)) + 1)
        recovered += 1
    return recovered


def count_completed(study) -> int:
    """Finished trials: completed, plus those stopped by staged evaluation (they were evaluated)."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def feasible_metrics(study, spec: StudySpec, dense_ppl: float) -> list[dict[str, float]]:
    optuna = _optuna()
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        m = t.user_attrs.get("metrics")
        if m and spec.budgets.feasible(m, dense_ppl):
            out.append(m)
    return out


def run_local(spec: StudySpec, storage_url: str, study_name: str, n_trials: int,
              progress: bool = True, evaluator_factory: Callable[[StudySpec], Any] | None = None,
              echo: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or resume) the study until it holds ``n_trials`` completed trials."""
    if n_trials < 1:
        raise StudyError(f"--trials must be at least 1, got {n_trials}")
    optuna = _optuna()
    storage = open_storage(storage_url)
    study = load_existing(storage, study_name)
    if study is not None:
        check_spec(study, spec)
        recover_dead_trials(study)
        done = count_completed(study)
        if done >= n_trials:
            echo(f"study {study_name!r} already has {done} completed trials (asked for {n_trials}); nothing to run")
            return SearchOutcome(study_name, done, 0, 0)

    from autocomp.study.evaluate import TrialEvaluator

    evaluator = (evaluator_factory or TrialEvaluator)(spec)
    if spec.budgets.max_size_mb is not None:
        floor = evaluator.min_size_mb()
        if floor > spec.budgets.max_size_mb:
            raise BudgetError(
                f"--max-size-mb {spec.budgets.max_size_mb:g} cannot be met: the smallest configuration of space "
                f"{spec.space.name!r} is {floor:.1f} MB (dense {evaluator.dense.size_mb:.1f} MB); raise the budget "
                "or search a space with fewer bits / more sparsity (e.g. include the embedding)"
            )
    echo(f"study {study_name!r} in {mask_url(storage_url)} (spec {spec.digest()}); {spec.budgets.describe()}; "
         f"dense perplexity {evaluator.dense.perplexity:.4g}, {evaluator.dense.size_mb:.1f} MB")
    if study is None:
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=make_sampler(spec),
                                    directions=["minimize"] * len(spec.objectives), load_if_exists=True)
        if HASH_ATTR in study.user_attrs:  # another process created it a moment ago
            check_spec(study, spec)
        else:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
            study.set_user_attr(HASH_ATTR, spec.digest())
            study.set_user_attr("autocomp_version", __version__)
    else:
        study.sampler = make_sampler(spec)
    study.set_user_attr(DENSE_ATTR, {"perplexity": evaluator.dense.perplexity, "size_mb": evaluator.dense.size_mb,
                                     "size_bytes": evaluator.dense.size_bytes})
    if not study.user_attrs.get(BASELINES_ATTR):
        _enqueue_initial(study, spec, evaluator, echo, progress)
    pinned = study.user_attrs.get(PINNED_ATTR, {})
    if spec.sampler == "evo":  # its ladders leave the pinned groups alone; the sensitivity table guides it
        study.sampler = make_sampler(spec, evaluator, pinned, study.user_attrs.get(SENSITIVITY_ATTR))

    done = count_completed(study)
    ran = failed = consecutive = pruned = 0
    bar = _progress_bar(progress, n_trials, done)
    best: tuple[float, float] | None = None
    for m in feasible_metrics(study, spec, evaluator.dense.perplexity):  # resumed: the front so far counts
        if best is None or m[spec.objectives[0]] < best[0]:
            best = (m[spec.objectives[0]], m["size_mb"])
    try:
        while done < n_trials:
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            screen = None
            if spec.staged_windows and not trial.user_attrs.get("baseline"):  # baselines always get the full budget
                screen = Screen(StagedConfig(spec.staged_windows), spec.budgets, evaluator.dense.perplexity,
                                spec.objectives, feasible_metrics(study, spec, evaluator.dense.perplexity))
            try:
                values, metrics = _run_trial(trial, spec, evaluator, screen, pinned)
            except TrialPruned as stop:
                trial.set_user_attr("pruned_reason", stop.reason)
                trial.set_user_attr("partial_metrics", stop.partial)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                consecutive = 0
                ran += 1
                done += 1
                pruned += 1
                if bar is not None:
                    bar.update(1)
                continue
            except KeyboardInterrupt:
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                _requeue(study, study._storage.get_trial(trial._trial_id), int(trial.user_attrs.get("retries", 0)))
                raise
            except (AutocompError, RuntimeError, ValueError, FloatingPointError, MemoryError) as exc:
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
                trial.set_user_attr("traceback", traceback.format_exc()[-8000:])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                failed += 1
                consecutive += 1
                if bar is not None:
                    bar.write(f"trial {trial.number} failed: {type(exc).__name__}: {exc}")
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    raise StudyError(f"{consecutive} trials failed in a row, last: {type(exc).__name__}: {exc}; "
                                     "the study is kept; fix the cause and re-run to resume") from None
                continue
            study.tell(trial, values)
            consecutive = 0
            ran += 1
            done += 1
            if spec.budgets.feasible(metrics, evaluator.dense.perplexity):
                point = (metrics[spec.objectives[0]], metrics["size_mb"])
                if best is None or point[0] < best[0]:
                    best = point
            if bar is not None:
                bar.update(1)
                if best is not None:
                    bar.set_postfix_str(f"best feasible {spec.objectives[0]}={best[0]:.4g} @ {best[1]:.1f} MB")
                else:
                    bar.set_postfix_str("no feasible point yet")
    finally:
        if bar is not None:
            bar.close()
    return SearchOutcome(study_name, done, ran, failed, pruned)


def _enqueue_initial(study, spec: StudySpec, evaluator, echo: Callable[[str], None], progress: bool) -> None:
    """First run of a study: the sensitivity pass (if asked), the uniform baselines, the seeded allocations."""
    from autocomp.study.sensitivity import choice_label, pinned_groups, seeded_params, sensitivity_table

    pinned: dict[str, dict[str, Any]] = {}
    table = None
    if spec.sensitivity:
        echo("sensitivity pass: error of every group at every choice ...")
        probe = evaluator.kl_probe() if spec.sensitivity in ("kl", "fisher") else None
        fisher = evaluator.fisher_factors() if spec.sensitivity == "fisher" else None
        table = sensitivity_table(spec.space, evaluator.targets, evaluator.stitcher, probe, fisher, progress=progress)
        pinned = pinned_groups(table, spec.pin_sensitive)
        study.set_user_attr(SENSITIVITY_ATTR, table)
        study.set_user_attr(PINNED_ATTR, pinned)
    baselines = spec.space.baseline_params(evaluator.targets, pinned)
    for params in baselines:  # all of them, even beyond n_trials: a later, longer run picks them up
        study.enqueue_trial(params, user_attrs={"baseline": True})
    if table is not None:
        groups = list(spec.space.groups(evaluator.targets))
        dims = [d for d, _ in spec.space.dimensions()]
        compressing, sizes = [], []
        dense_total = sum(max(r["bytes"] for r in table[g].values()) for g in groups)
        for params in baselines:
            values = {g: {d: params[f"{g}:{d}"] for d in dims} for g in groups}
            total = sum(table[g][choice_label(values[g])]["bytes"] for g in groups)
            if total < dense_total:
                compressing.append(params)
                sizes.append(total)
        seeded = seeded_params(spec.space, evaluator.targets, table, compressing, sizes, pinned)
        for params in seeded:
            study.enqueue_trial(params, user_attrs={"seeded": "sensitivity"})
    study.set_user_attr(BASELINES_ATTR, True)


def _run_trial(trial, spec: StudySpec, evaluator, screen=None, pinned=None) -> tuple[list[float], dict[str, float]]:
    start = time.perf_counter()
    per_layer = spec.space.suggest(trial, evaluator.targets, pinned)
    # sequential mode collects no dense statistics up front, but its plans are calibrated all the same
    calibrated = bool(evaluator.stats) or getattr(evaluator, "calib_windows", None) is not None
    plan = CompressionPlan.explicit(per_layer, calibration=spec.calibration() if calibrated else None,
                                    embeddings=any(not t.in_blocks for t in evaluator.targets))
    trial.set_user_attr("plan", plan.to_dict())
    uniform = spec.space.describe_uniform(trial.params, list(pinned or {}))
    if uniform:
        trial.set_user_attr("uniform", uniform)
    metrics = evaluator.evaluate(per_layer, screen) if screen is not None else evaluator.evaluate(per_layer)
    metrics["seconds"] = time.perf_counter() - start
    if not math.isfinite(metrics["perplexity"]):
        trial.set_user_attr("note", "perplexity overflowed: the compressed model is broken")
    trial.set_user_attr("metrics", metrics)
    for name, value in spec.budgets.constraints(metrics, evaluator.dense.perplexity).items():
        trial.set_constraint(name, value)
    return objective_values(metrics, spec.objectives), metrics


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", dynamic_ncols=True)
