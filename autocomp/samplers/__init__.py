"""Samplers, chosen by name (``StudySpec.sampler``): NSGA-II (default), multivariate TPE, and the
level-switch sampler ``evo`` (:mod:`autocomp.samplers.evo`); a space that searches distillation steps
wraps the chosen sampler in the cost-aware one (:mod:`autocomp.samplers.cost_aware`).
"""

from __future__ import annotations

from typing import Any, Mapping

from autocomp.config.spec import SAMPLERS, StudySpec  # noqa: F401  (the names make_sampler accepts)
from autocomp.store.schema import optuna_quiet



def make_sampler(spec: StudySpec, evaluator=None, pinned: Mapping[str, Any] | None = None, table=None,
                 seed: int | None = None):
    """NSGA-II (default), multivariate TPE or level-switch mutation (``evo``, needs the evaluator's
    targets), seeded. Budgets reach NSGA-II and TPE as per-trial constraints (``trial.set_constraint``),
    which they read from the stored trials; ``evo`` mutates the feasible front by the stored metrics.
    A space with searched distillation steps wraps it in the cost-aware sampler
    (:mod:`autocomp.samplers.cost_aware`) unless ``student.cost_aware`` is false."""
    seed = spec.seed if seed is None else seed
    student = spec.space.student
    if student is not None and student.cost_aware and len(dict(student.all_dimensions())["steps"]) > 1:
        from autocomp.samplers.cost_aware import CostAwareSampler

        return CostAwareSampler(_base_sampler(spec, seed, evaluator, pinned, table), student.cost_share)
    return _base_sampler(spec, seed, evaluator, pinned, table)


def _base_sampler(spec: StudySpec, seed: int, evaluator, pinned, table):
    optuna = optuna_quiet()
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if spec.sampler == "evo" and evaluator is not None:
        from autocomp.samplers.evo import LevelSwitchSampler, choice_ladders, ladder_errors

        dense_ppl = evaluator.dense.perplexity

        def feasible(trial) -> bool:
            metrics = trial.user_attrs.get("metrics")
            return bool(metrics) and spec.budgets.feasible(metrics, dense_ppl)

        ladders = choice_ladders(spec.space, evaluator.targets, pinned)
        errors = ladder_errors(ladders, table) if table else None
        return LevelSwitchSampler(ladders, feasible, seed=seed, errors=errors)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
