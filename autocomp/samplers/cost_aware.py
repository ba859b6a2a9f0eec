"""Cost-aware search: cheap distillation budgets first, expensive ones once the study can afford them.

A distilled student's trial costs roughly its distillation steps times the seconds per step, which
can be a hundred times an undistilled trial. Multi-objective samplers know nothing of cost, so left
alone they spend most of a study's time on a few long distillations before the front has taken shape.

:class:`CostAwareSampler` wraps any Optuna sampler and caps the ``student:steps`` it proposes: a
trial may cost at most ``share`` times the compute the study has already spent. The price of a step
is measured, not assumed: the median of ``seconds_distill / distill_steps`` over the study's
finished trials (each trial records both). Until a distilled trial has finished, only the smallest
non-zero step count (and 0) is allowed. Proposals within the cap pass unchanged, so the base
sampler's search is untouched where cost does not bind; the values a trial ran with are its params,
as for any sampler.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import optuna

STEPS_PARAM = "student:steps"


def spent_seconds(trials: Sequence[Any]) -> float:
    """Compute the study has spent: the measured seconds of every finished trial."""
    return float(sum(t.user_attrs.get("metrics", {}).get("seconds", 0.0) for t in trials))


def seconds_per_step(trials: Sequence[Any]) -> float | None:
    """Median measured seconds per distillation step, or None before any distilled trial finished.
    Trials that took a cached student (no distillation ran) do not count."""
    rates = []
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        if m.get("distill_steps", 0) > 0 and m.get("seconds_distill", 0) > 0 and not m.get("student_cached"):
            rates.append(m["seconds_distill"] / m["distill_steps"])
    return statistics.median(rates) if rates else None


def allowed_steps(choices: Sequence[int], trials: Sequence[Any], share: float) -> list[int]:
    """The step counts a new trial may use given what the study has spent (always 0 and the smallest
    non-zero choice)."""
    ordered = sorted(choices)
    nonzero = [c for c in ordered if c > 0]
    allowed = [c for c in ordered if c == 0] + nonzero[:1]
    rate = seconds_per_step(trials)
    if rate is not None:
        budget = share * spent_seconds(trials)
        allowed += [c for c in nonzero[1:] if rate * c <= budget]
    return allowed


def cap_steps(value: int, choices: Sequence[int], trials: Sequence[Any], share: float) -> int:
    """``value`` if affordable, else the largest affordable choice below it."""
    allowed = allowed_steps(choices, trials, share)
    if value in allowed:
        return value
    below = [c for c in allowed if c <= value]
    return max(below) if below else min(allowed)


def _finished(study) -> list[Any]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


class CostAwareSampler(optuna.samplers.BaseSampler):
    """Any Optuna sampler, with ``student:steps`` capped by the measured cost (see module docstring)."""

    def __init__(self, base, share: float = 0.5) -> None:
        self.base = base
        self.share = share

    # relative sampling (NSGA-II offspring, multivariate TPE)
    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        params = self.base.sample_relative(study, trial, search_space)
        if STEPS_PARAM in params and STEPS_PARAM in search_space:
            params = dict(params)
            params[STEPS_PARAM] = cap_steps(params[STEPS_PARAM], search_space[STEPS_PARAM].choices,
                                            _finished(study), self.share)
        return params

    def sample_independent(self, study, trial, param_name, param_distribution):
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        if param_name == STEPS_PARAM:
            value = cap_steps(value, param_distribution.choices, _finished(study), self.share)
        return value

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()

