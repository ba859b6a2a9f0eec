"""The feasible Pareto set of a study and the recommendation rule, over stored trial records.

Budgets given here replace the study's own, so ``recommend`` can answer "what if I allowed 10%
instead of 5%" from stored metrics (:mod:`autocomp.store.records` reads them; nothing is re-run).

Recommendation rule (``prefer="auto"``): with a quality budget (perplexity increase or KL), the
smallest feasible configuration (you said how much quality you give up, so take the bytes); with
only size, latency or memory budgets, the best quality that fits; with no budget, the knee of the
front (the point nearest the utopia point after scaling each objective to [0, 1]). ``prefer`` can
force ``size``, ``quality`` or ``knee``.
"""

from __future__ import annotations

import math
from typing import Sequence

from autocomp.config.objectives import Budgets
from autocomp.errors import StudyError
from autocomp.multiobjective import non_dominated
from autocomp.store.records import StudyRecords, TrialRecord

PREFERENCES = ("auto", "size", "quality", "knee")


def objective_vector(record: TrialRecord, objectives: Sequence[str]) -> tuple[float, ...]:
    """The record's values of ``objectives``, a missing or non-finite one as infinity (never chosen)."""
    out = []
    for name in objectives:
        v = record.metrics.get(name)
        out.append(float(v) if v is not None and math.isfinite(v) else math.inf)
    return tuple(out)


def mark_feasible(study: StudyRecords, budgets: Budgets) -> list[TrialRecord]:
    """Set every record's ``feasible``: it meets ``budgets`` and its figures are finite
    (:attr:`~autocomp.store.records.TrialRecord.sound`)."""
    dense_ppl = study.dense.get("perplexity", math.nan)
    for r in study.records:
        r.feasible = r.sound and budgets.feasible(r.metrics, dense_ppl)
    return study.records


def pareto_front(study: StudyRecords, budgets: Budgets | None = None) -> list[TrialRecord]:
    """The feasible non-dominated trials under ``budgets`` (default: the study's), sorted by size."""
    budgets = study.spec.budgets if budgets is None else budgets
    if budgets.needs_latency and study.spec.latency is None:
        raise StudyError(f"study {study.study_name!r} did not measure latency or memory; a latency or memory "
                         "budget needs a study searched with one (autocomp search --max-latency-ms ...)")
    feasible = [r for r in mark_feasible(study, budgets) if r.feasible]
    objectives = study.spec.objectives
    front = non_dominated([(objective_vector(r, objectives), r) for r in feasible])
    return sorted(front, key=lambda r: (r.metrics.get("size_mb", 0.0), r.trial))


def recommend(study: StudyRecords, budgets: Budgets | None = None, prefer: str = "auto") -> TrialRecord | None:
    """One trial of the feasible front chosen by ``prefer`` (module docstring); None when nothing is feasible."""
    if prefer not in PREFERENCES:
        raise StudyError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    budgets = study.spec.budgets if budgets is None else budgets
    front = pareto_front(study, budgets)
    if not front:
        return None
    return choose(front, budgets, quality_objective(study.spec.objectives), prefer)


def quality_objective(objectives: Sequence[str]) -> str:
    """The objective that measures quality: the first that is not ``size_mb`` (``perplexity`` if none)."""
    return next((name for name in objectives if name != "size_mb"), "perplexity")


def choose(front: list[TrialRecord], budgets: Budgets, quality: str, prefer: str = "auto") -> TrialRecord:
    """The recommendation rule (module docstring) applied to a non-empty front."""
    if prefer not in PREFERENCES:
        raise StudyError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    if prefer == "auto":
        if budgets.max_ppl_increase_pct is not None or budgets.max_kl is not None:
            prefer = "size"
        elif budgets.max_size_mb is not None or budgets.needs_latency:
            prefer = "quality"
        else:
            prefer = "knee"
    if prefer == "size":
        return min(front, key=lambda r: objective_vector(r, ("size_mb", quality)) + (r.trial,))
    if prefer == "quality":
        return min(front, key=lambda r: objective_vector(r, (quality, "size_mb")) + (r.trial,))
    return _knee(front, (quality, "size_mb"))


def _knee(front: list[TrialRecord], objectives: Sequence[str]) -> TrialRecord:
    vecs = [tuple(x if math.isfinite(x) else 1e300 for x in objective_vector(r, objectives)) for r in front]
    lows = [min(v[i] for v in vecs) for i in range(len(objectives))]
    highs = [max(v[i] for v in vecs) for i in range(len(objectives))]

    def distance(v: Sequence[float]) -> float:
        return math.sqrt(sum(((x - lo) / (hi - lo) if hi > lo else 0.0) ** 2 for x, lo, hi in zip(v, lows, highs)))

    return min(zip(vecs, front), key=lambda pair: (distance(pair[0]), pair[1].trial))[1]
