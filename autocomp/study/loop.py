"""The trial loop every worker runs: ask Optuna, evaluate, tell, until the study is complete.

One process or many (``autocomp worker`` on several machines, Ray actors) run this same loop against
the same storage, which is the only thing they share:

* the target is ``n_trials`` *finished* trials (completed, or stopped early by staged evaluation);
  a worker asks for a new trial only while finished + running trials are below it, and otherwise
  waits for the others, taking over their trials if they die (see :mod:`autocomp.study.recovery`);
* a configuration that a finished trial already evaluated is not evaluated again: the new trial
  takes its figures (``reused_from``); one that another worker is evaluating right now (a lower trial
  number) is waited for. Only retries of lost trials evaluate a plan twice;
* a trial that raises (a layer that cannot take its plan, out of memory, NaN) or scores a non-finite
  perplexity, KL or objective is recorded as failed with its plan, reason and traceback, never as
  completed, and the loop goes on; ``MAX_CONSECUTIVE_FAILURES`` in a row stop it,
  since then the configuration itself is broken;
* Ctrl-C marks the running trial failed, queues it again, and exits; the next run picks it up;
* a trial that another worker gave up as lost while it was still running here (a stalled process
  whose heartbeat lapsed) is dropped with a message: its retry runs, the loop goes on.
"""

from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from autocomp.errors import AutocompError, NonFiniteScoreError, StudyError
from autocomp.config.objectives import objective_values
from autocomp.config.plan import CompressionPlan
from autocomp.config.spec import StudySpec
from autocomp.store.schema import optuna_quiet
from autocomp.study.recovery import Heartbeat, claim, recover_dead_trials, requeue
from autocomp.study.staged import Screen, StagedConfig, TrialPruned

MAX_CONSECUTIVE_FAILURES = 5
POLL_S = 1.0            # how often a waiting worker looks at the storage


@dataclass
class LoopCounts:
    ran: int = 0        # trials this loop finished (completed, stopped early or reused)
    failed: int = 0
    pruned: int = 0     # stopped early by staged evaluation
    reused: int = 0     # took the figures of an identical finished configuration

    def add(self, other: "LoopCounts") -> None:
        self.ran += other.ran
        self.failed += other.failed
        self.pruned += other.pruned
        self.reused += other.reused


def count_completed(study) -> int:
    """Finished trials: completed, plus those stopped by staged evaluation (they were evaluated)."""
    optuna = optuna_quiet()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def trial_counts(study) -> tuple[int, int]:
    """(finished, running) trials, from one read of the storage."""
    optuna = optuna_quiet()
    S = optuna.trial.TrialState
    states = [t.state for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))]
    running = states.count(S.RUNNING)
    return len(states) - running, running


def feasible_metrics(study, spec: StudySpec, dense_ppl: float) -> list[dict[str, float]]:
    optuna = optuna_quiet()
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        m = t.user_attrs.get("metrics")
        if m and spec.budgets.feasible(m, dense_ppl):
            out.append(m)
    return out


def params_key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def trial_loop(study, spec: StudySpec, evaluator, n_trials: int, *, worker: str, pinned: Mapping[str, Any] | None = None,
               progress: bool = True, echo: Callable[[str], None] = print, claim_attrs: Mapping[str, Any] | None = None,
               should_stop: Callable[[], bool] | None = None) -> LoopCounts:
    """Run trials until the study holds ``n_trials`` finished ones (or ``should_stop()``)."""
    optuna = optuna_quiet()
    dense_ppl = evaluator.dense.perplexity
    counts = LoopCounts()
    consecutive = 0
    bar = progress_bar(progress, n_trials, count_completed(study))
    best = None
    for m in feasible_metrics(study, spec, dense_ppl):  # resumed: the front so far counts
        if best is None or m[spec.objectives[0]] < best[0]:
            best = (m[spec.objectives[0]], m["size_mb"])
    try:
        while should_stop is None or not should_stop():
            recover_dead_trials(study)
            done, running = trial_counts(study)
            if bar is not None:
                bar.n = min(done, n_trials)
                bar.refresh()
            if done >= n_trials:
                break
            if done + running >= n_trials:
                time.sleep(POLL_S)  # the rest is in other workers' hands; take over if they die
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna warns that heartbeats are meant for optimize()
                trial = study.ask()
            claim(trial, worker, **(claim_attrs or {}))
            screen = None
            if spec.staged_windows and not trial.user_attrs.get("baseline"):  # baselines always get the full budget
                screen = Screen(StagedConfig(spec.staged_windows), spec.budgets, dense_ppl,
                                spec.objectives, feasible_metrics(study, spec, dense_ppl))
            try:
                with Heartbeat(study, trial):
                    values, metrics = _run_trial(study, trial, spec, evaluator, screen, pinned)
                study.tell(trial, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                say(bar, echo, f"trial {trial.number} was given up as lost by another worker while it ran here; "
                               "its retry stands for it")
                continue
            except TrialPruned as stop:
                trial.set_user_attr("pruned_reason", stop.reason)
                trial.set_user_attr("partial_metrics", stop.partial)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                consecutive = 0
                counts.ran += 1
                counts.pruned += 1
                counts.reused += int("reused_from" in trial.user_attrs)
                continue
            except KeyboardInterrupt:
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                requeue(study, study._storage.get_trial(trial._trial_id), int(trial.user_attrs.get("retries", 0)))
                raise
            except (AutocompError, RuntimeError, ValueError, FloatingPointError, MemoryError) as exc:
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
                trial.set_user_attr("traceback", traceback.format_exc()[-8000:])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                counts.failed += 1
                consecutive += 1
                say(bar, echo, f"trial {trial.number} failed: {type(exc).__name__}: {exc}")
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    raise StudyError(f"{consecutive} trials failed in a row, last: {type(exc).__name__}: {exc}; "
                                     "the study is kept; fix the cause and re-run to resume") from None
                continue
            consecutive = 0
            counts.ran += 1
            counts.reused += int("reused_from" in trial.user_attrs)
            if spec.budgets.feasible(metrics, dense_ppl):
                point = (metrics[spec.objectives[0]], metrics["size_mb"])
                if best is None or point[0] < best[0]:
                    best = point
            if bar is not None:   # its count is refreshed at the top of the loop
                if best is not None:
                    bar.set_postfix_str(f"best feasible {spec.objectives[0]}={best[0]:.4g} @ {best[1]:.1f} MB")
                else:
                    bar.set_postfix_str("no feasible point yet")
    finally:
        if bar is not None:
            bar.close()
    return counts


def _twin(study, trial, poll_s: float = POLL_S):
    """A finished trial with the same configuration, waiting for one that a lower-numbered running trial
    is evaluating right now; None if there is none (or it failed)."""
    optuna = optuna_quiet()
    S = optuna.trial.TrialState
    key = params_key(trial.params)
    while True:
        waiting_for = None
        for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING)):
            if t.number == trial.number or params_key(t.params) != key:
                continue
            if t.state == S.PRUNED or (t.state == S.COMPLETE and "metrics" in t.user_attrs):
                return t
            if t.state == S.RUNNING and t.number < trial.number:
                waiting_for = t
        if waiting_for is None:
            return None
        time.sleep(poll_s)


def _reuse(trial, twin, spec: StudySpec, evaluator) -> tuple[list[float], dict[str, float]]:
    trial.set_user_attr("reused_from", twin.number)
    if twin.state.name == "PRUNED":
        partial = dict(twin.user_attrs.get("partial_metrics", {}))
        raise TrialPruned(f"same configuration as trial {twin.number}: {twin.user_attrs.get('pruned_reason', '')}", partial)
    metrics = dict(twin.user_attrs["metrics"])
    metrics["seconds"] = 0.0
    # checked again: a twin stored before broken trials were failed
    return record_metrics(trial, spec, metrics, evaluator.dense.perplexity)


def _run_trial(study, trial, spec: StudySpec, evaluator, screen=None, pinned=None) -> tuple[list[float], dict[str, float]]:
    start = time.perf_counter()
    per_layer = spec.space.suggest(trial, evaluator.targets, pinned)
    student = None
    if spec.space.student is not None:
        student = spec.space.student.resolve(spec.space.student.suggest(trial), evaluator.teacher_dims)
    if student is not None:  # the teacher layers' plans, carried over to the student built from them
        per_layer = evaluator.student_plan(per_layer, student)
    store_plan(trial, evaluator, per_layer, student)
    uniform = spec.space.describe_uniform(trial.params, list(pinned or {}))
    if uniform:
        trial.set_user_attr("uniform", uniform)
    twin = _twin(study, trial)
    if twin is not None:
        return _reuse(trial, twin, spec, evaluator)
    return evaluate_plan(trial, spec, evaluator, per_layer, screen, student, start)


def trial_plan(evaluator, per_layer, student=None) -> CompressionPlan:
    """The :class:`CompressionPlan` a trial stores: every layer named, with the study's calibration."""
    return CompressionPlan.explicit(per_layer, calibration=evaluator.calibration,
                                    embeddings=any(not t.in_blocks for t in evaluator.targets), student=student)


def store_plan(trial, evaluator, per_layer, student=None) -> CompressionPlan:
    """:func:`trial_plan`, stored as the trial's ``plan`` attribute."""
    plan = trial_plan(evaluator, per_layer, student)
    trial.set_user_attr("plan", plan.to_dict())
    return plan


def evaluate_plan(trial, spec: StudySpec, evaluator, per_layer, screen=None, student=None,
                  start: float | None = None) -> tuple[list[float], dict[str, float]]:
    """Evaluate ``per_layer`` and record it on ``trial``: its metrics (NonFiniteScoreError for a broken
    model), its budget constraints; returns (objective values, metrics)."""
    start = time.perf_counter() if start is None else start
    kwargs = {"student": student} if student is not None else {}
    metrics = evaluator.evaluate(per_layer, screen, **kwargs) if screen is not None else evaluator.evaluate(per_layer, **kwargs)
    metrics["seconds"] = time.perf_counter() - start
    return record_metrics(trial, spec, metrics, evaluator.dense.perplexity)


def record_metrics(trial, spec: StudySpec, metrics: dict[str, float], dense_ppl: float) -> tuple[list[float], dict[str, float]]:
    """Store ``metrics`` and the budget constraints on ``trial`` (NonFiniteScoreError for a broken
    model); returns (objective values, metrics)."""
    check_finite_scores(metrics, spec.objectives)
    trial.set_user_attr("metrics", metrics)
    for name, value in spec.budgets.constraints(metrics, dense_ppl).items():
        trial.set_constraint(name, value)
    return objective_values(metrics, spec.objectives), metrics


def check_finite_scores(metrics: Mapping[str, Any], objectives: tuple[str, ...]) -> None:
    """NonFiniteScoreError when the perplexity, the KL (when measured) or an objective of a trial is
    not a finite number: the compressed model is broken, and the trial fails with that reason."""
    names = ["perplexity", "kl", *objectives]
    bad = [f"{name} {metrics[name]}" for name in dict.fromkeys(names)
           if name in metrics and metrics[name] is not None
           and not (isinstance(metrics[name], (int, float)) and math.isfinite(metrics[name]))]
    if bad:
        raise NonFiniteScoreError(f"non-finite score ({', '.join(bad)}): the compressed model is broken "
                                  "(overflow or NaN in its weights or activations)")


def say(bar, echo: Callable[[str], None], message: str) -> None:
    """A message that does not break the progress bar."""
    if bar is not None:
        bar.write(message)
    else:
        echo(message)


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", dynamic_ncols=True)
