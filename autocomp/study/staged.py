"""Staged evaluation: stop hopeless candidates after a small token budget (EvoPress-style).

Optuna's pruners do not support multi-objective studies, so this is autocomp's own. Before any
forward pass a candidate's size is known exactly: one over ``--max-size-mb`` stops at stage 0. Stage
1 scores the first ``windows`` evaluation windows and compares each window's NLL (and KL) with the
dense model's on the same window: these paired per-window differences are far less noisy than the
raw perplexity. From their mean and standard error an *optimistic* bound is formed,

    LB = mean - t_{0.975, k-1} * sd / sqrt(k)       (k windows, Student t quantile)

so that a candidate is stopped only when even its optimistic full-budget perplexity (or KL)

* breaks the quality budget (``--max-ppl-increase`` / ``--max-kl``), or
* is dominated by a completed feasible trial that is no larger (it cannot reach the feasible front).

Stopped trials are stored as PRUNED with their partial metrics and the reason; survivors are scored
on the remaining windows and stored as usual (the stage-1 windows are not evaluated twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from autocomp.config.objectives import Budgets

# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond that the normal 1.96
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile(dof: int) -> float:
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


@dataclass(frozen=True)
class StagedConfig:
    windows: int = 4            # evaluation windows in stage 1 (a prefix of the evaluation windows)

    def __post_init__(self) -> None:
        if self.windows < 2:
            from autocomp.errors import StudyError

            raise StudyError(f"staged evaluation needs at least 2 windows in stage 1 (to estimate noise), got {self.windows}")


@dataclass
class StageEstimate:
    """Optimistic (lower) bounds of the full-budget figures from stage-1 windows."""

    ppl_estimate: float
    ppl_lower: float
    kl_estimate: float | None
    kl_lower: float | None
    windows: int


def optimistic_bound(diffs: torch.Tensor) -> tuple[float, float]:
    """(mean, lower confidence bound) of per-window differences."""
    k = diffs.numel()
    mean = float(diffs.mean())
    sd = float(diffs.std(unbiased=True)) if k > 1 else math.inf
    return mean, mean - t_quantile(k - 1) * sd / math.sqrt(k)


def estimate(nll: torch.Tensor, tokens: torch.Tensor, kl: torch.Tensor | None, dense_nll: torch.Tensor,
             dense_ppl: float) -> StageEstimate:
    """Bounds from per-window summed NLL / KL of the candidate and the dense NLL on the same windows."""
    per_token_diff = (nll - dense_nll) / tokens
    mean, lower = optimistic_bound(per_token_diff.double())
    kl_est = kl_low = None
    if kl is not None:
        kl_est, kl_low = optimistic_bound((kl / tokens).double())
        kl_low = max(kl_low, 0.0)
    cap = 700.0
    return StageEstimate(dense_ppl * math.exp(min(mean, cap)), dense_ppl * math.exp(min(lower, cap)),
                         kl_est, kl_low, int(nll.numel()))


def stage0_reason(size_mb: float, budgets: Budgets) -> str | None:
    if budgets.max_size_mb is not None and size_mb > budgets.max_size_mb:
        return f"size {size_mb:.2f} MB breaks the size budget of {budgets.max_size_mb:g} MB (known before evaluation)"
    return None


def stage1_reason(est: StageEstimate, size_mb: float, budgets: Budgets, dense_ppl: float, objectives: Sequence[str],
                  front: Sequence[Mapping[str, float]]) -> str | None:
    """Why the candidate should stop after stage 1, or None to continue.

    ``front`` holds the metrics of completed feasible trials. The quality objective is compared by
    its optimistic bound, size exactly.
    """
    if budgets.max_ppl_increase_pct is not None:
        limit = dense_ppl * (1 + budgets.max_ppl_increase_pct / 100)
        if est.ppl_lower > limit:
            return (f"perplexity at least {est.ppl_lower:.4g} (95% optimistic bound over {est.windows} windows, "
                    f"estimate {est.ppl_estimate:.4g}) breaks the budget of {limit:.4g}")
    if budgets.max_kl is not None and est.kl_lower is not None and est.kl_lower > budgets.max_kl:
        return f"KL at least {est.kl_lower:.4g} (optimistic bound) breaks the budget of {budgets.max_kl:g}"
    quality = "kl" if "kl" in objectives else "perplexity"
    bound = est.kl_lower if quality == "kl" else est.ppl_lower
    if bound is None:
        return None
    for m in front:
        q, s = m.get(quality), m.get("size_mb")
        if q is None or s is None:
            continue
        if s <= size_mb and q <= bound and (s < size_mb or q < bound):
            return (f"dominated: a feasible trial of {s:.2f} MB has {quality} {q:.4g}, below this candidate's "
                    f"optimistic bound {bound:.4g} at {size_mb:.2f} MB")
    return None


class TrialPruned(Exception):
    """Raised by :class:`Screen` to stop a candidate; carries the reason and the partial metrics."""

    def __init__(self, reason: str, partial: dict[str, float]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


@dataclass
class Screen:
    """The stopping rules for one trial, given the study's state when the trial started."""

    config: StagedConfig
    budgets: Budgets
    dense_ppl: float
    objectives: Sequence[str]
    front: Sequence[Mapping[str, float]]

    def after_size(self, size_mb: float) -> None:
        reason = stage0_reason(size_mb, self.budgets)
        if reason:
            raise TrialPruned(reason, {"size_mb": size_mb, "stage": 0})

    def after_stage1(self, est: StageEstimate, size_mb: float) -> None:
        reason = stage1_reason(est, size_mb, self.budgets, self.dense_ppl, self.objectives, self.front)
        if reason:
            partial = {"size_mb": size_mb, "stage": 1, "windows": est.windows, "perplexity_estimate": est.ppl_estimate,
                       "perplexity_lower": est.ppl_lower}
            if est.kl_estimate is not None:
                partial.update(kl_estimate=est.kl_estimate, kl_lower=est.kl_lower)
            raise TrialPruned(reason, partial)
