"""Reading a study back: trial records, the feasible Pareto set, and the recommendation.

Everything here reads only the storage: no model is loaded. In a latency study, the end-to-end
figures re-measured after the search (:mod:`autocomp.study.remeasure`) replace the search's own.
Budgets given here replace the study's own, so ``recommend`` can answer "what if I allowed 10%
instead of 5%" from stored metrics.

Recommendation rule (``prefer="auto"``): with a quality budget (perplexity increase or KL), the
smallest feasible configuration (you said how much quality you give up, so take the bytes); with
only size, latency or memory budgets, the best quality that fits; with no budget, the knee of the
front (the point nearest the utopia point after scaling each objective to [0, 1]). ``prefer`` can
force ``size``, ``quality`` or ``knee``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from autocomp.errors import StudyError, TrialNotFoundError
from autocomp.objectives import Budgets
from autocomp.spec import StudySpec
from autocomp.study.prepare import DENSE_ATTR, SPEC_ATTR, load_existing
from autocomp.study.remeasure import REMEASURED_ATTR, overlay
from autocomp.study.storage import mask_url, open_storage

PREFERENCES = ("auto", "size", "quality", "knee")


@dataclass
class TrialRecord:
    trial: int
    metrics: dict[str, float]
    plan: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    uniform: str | None = None
    feasible: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "metrics": self.metrics, "plan": self.plan, "uniform": self.uniform,
                "feasible": self.feasible}


@dataclass
class StudyRecords:
    study_name: str
    spec: StudySpec
    dense: dict[str, float]
    records: list[TrialRecord]     # completed trials
    n_failed: int
    n_running: int


def load_records(storage_url: str, study_name: str) -> StudyRecords:
    import optuna

    study = load_existing(open_storage(storage_url, must_exist=True), study_name)
    if study is None:
        raise StudyError(f"no study named {study_name!r} in {mask_url(storage_url)}")
    if SPEC_ATTR not in study.user_attrs:
        raise StudyError(f"study {study_name!r} was not created by autocomp")
    spec = StudySpec.from_dict(study.user_attrs[SPEC_ATTR])
    dense = study.user_attrs.get(DENSE_ATTR, {})
    remeasured = study.user_attrs.get(REMEASURED_ATTR, {})  # end-to-end figures taken after the search
    records, failed, running = [], 0, 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE and "metrics" in t.user_attrs:
            metrics = dict(t.user_attrs["metrics"])
            if str(t.number) in remeasured:
                metrics = overlay(metrics, remeasured[str(t.number)])
            records.append(TrialRecord(t.number, metrics, dict(t.user_attrs["plan"]),
                                       dict(t.params), t.user_attrs.get("uniform")))
        elif t.state == optuna.trial.TrialState.FAIL:
            failed += 1
        elif t.state == optuna.trial.TrialState.RUNNING:
            running += 1
    return StudyRecords(study_name, spec, dense, records, failed, running)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: list[tuple[Sequence[float], Any]]) -> list[Any]:
    """Items whose objective vectors no other item dominates (duplicates all kept)."""
    return [item for vec, item in points if not any(dominates(other, vec) for other, _ in points)]


def _values(record: TrialRecord, objectives: Sequence[str]) -> tuple[float, ...]:
    out = []
    for name in objectives:
        v = record.metrics.get(name)
        out.append(float(v) if v is not None and math.isfinite(v) else math.inf)
    return tuple(out)


def mark_feasible(study: StudyRecords, budgets: Budgets) -> list[TrialRecord]:
    dense_ppl = study.dense.get("perplexity", math.nan)
    for r in study.records:
        r.feasible = budgets.feasible(r.metrics, dense_ppl)
    return study.records


def pareto_front(study: StudyRecords, budgets: Budgets | None = None) -> list[TrialRecord]:
    """The feasible non-dominated trials under ``budgets`` (default: the study's), sorted by size."""
    budgets = study.spec.budgets if budgets is None else budgets
    if budgets.needs_latency and study.spec.latency is None:
        raise StudyError(f"study {study.study_name!r} did not measure latency or memory; a latency or memory "
                         "budget needs a study searched with one (autocomp search --max-latency-ms ...)")
    feasible = [r for r in mark_feasible(study, budgets) if r.feasible]
    objectives = study.spec.objectives
    front = non_dominated([(_values(r, objectives), r) for r in feasible])
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
        return min(front, key=lambda r: (r.metrics["size_mb"], r.metrics.get(quality, math.inf)))
    if prefer == "quality":
        return min(front, key=lambda r: (r.metrics.get(quality, math.inf), r.metrics["size_mb"]))
    return _knee(front, (quality, "size_mb"))


def _knee(front: list[TrialRecord], objectives: Sequence[str]) -> TrialRecord:
    vecs = [_values(r, objectives) for r in front]
    lows = [min(v[i] for v in vecs) for i in range(len(objectives))]
    highs = [max(v[i] for v in vecs) for i in range(len(objectives))]

    def distance(v: Sequence[float]) -> float:
        return math.sqrt(sum(((x - lo) / (hi - lo) if hi > lo else 0.0) ** 2 for x, lo, hi in zip(v, lows, highs)))

    return min(zip(vecs, front), key=lambda pair: (distance(pair[0]), pair[1].trial))[1]


def find_trial(study: StudyRecords, number: int) -> TrialRecord:
    for r in study.records:
        if r.trial == number:
            return r
    done = ", ".join(str(r.trial) for r in study.records[:20])
    raise TrialNotFoundError(f"trial {number} is not a completed trial of study {study.study_name!r} (completed: {done or 'none'})")


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) and bounded by ``reference``."""
    pts = sorted((x, y) for x, y in points if x < reference[0] and y < reference[1])
    area, prev_y = 0.0, reference[1]
    for x, y in pts:  # sweep by the first objective, adding each step of the staircase
        if y < prev_y:
            area += (reference[0] - x) * (prev_y - y)
            prev_y = y
    return area
