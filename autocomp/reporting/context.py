"""What every part of a report reads: the study's records, marked and indexed once.

:class:`ReportData` is built from the outputs of :mod:`autocomp.front` (records already marked
feasible, the front, the recommendation) and an optional validation dict; figures, tables and the
page only read it. The *quality* objective is the first objective that is not ``size_mb`` (as in
:func:`autocomp.front.recommend`); it is the y axis of every plot.

Validation dict (version 1), produced by the validation step::

    {"version": 1, "level": 0.95,
     "sets": {"search": {"label": ...}, "heldout": {"label": ...}, ...},
     "dense": {"sets": {name: {"perplexity", "tokens", "windows"}}, "tasks": {name: {"metric", "value", ...}}},
     "trials": {"12": {"sets": {name: {"perplexity", "ppl_increase_pct", "ppl_increase_ci", "kl", "kl_ci", "windows"}},
                       "tasks": {name: {"metric", "value", "stderr", "n", "drop_points"}},
                       "verdict": {"search_feasible", "heldout_feasible", "flagged", "reasons"}}}}

Trial keys may be strings (JSON) or ints; they are normalised to ints here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from autocomp.errors import ReportError
from autocomp.front import quality_objective
from autocomp.store.records import StudyRecords, TrialRecord, find_trial
from autocomp.config.objectives import OBJECTIVES
from autocomp.validation import HELDOUT, SEARCH, VALIDATION_VERSION

SEARCH_SET, HELDOUT_SET = SEARCH, HELDOUT


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def wants_log_axis(values: Sequence[float]) -> bool:
    """A log axis when the positive values span more than a factor 20 (broken configs next to good ones)."""
    positive = [v for v in values if v > 0]
    return bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > 20


@dataclass
class ReportData:
    records: StudyRecords
    front: list[TrialRecord]
    recommended: TrialRecord | None
    validation: dict[str, Any] | None
    selected: list[TrialRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.quality = quality_objective(self.records.spec.objectives)
        self.front_trials = {r.trial for r in self.front}
        self.validated: dict[int, dict[str, Any]] = {}
        if self.validation is not None:
            self.validated = normalise_validation_trials(self.validation)

    # ---- study facts ---------------------------------------------------------------------
    @property
    def study_name(self) -> str:
        return self.records.study_name

    @property
    def quality_label(self) -> str:
        return OBJECTIVES.get(self.quality, self.quality)

    @property
    def feasible(self) -> list[TrialRecord]:
        return [r for r in self.records.records if r.feasible]

    @property
    def infeasible(self) -> list[TrialRecord]:
        return [r for r in self.records.records if not r.feasible]

    def is_recommended(self, record: TrialRecord) -> bool:
        return self.recommended is not None and record.trial == self.recommended.trial

    def quality_of(self, record: TrialRecord) -> float | None:
        return finite(record.metrics.get(self.quality))

    def size_of(self, record: TrialRecord) -> float | None:
        return finite(record.metrics.get("size_mb"))

    def best_so_far(self, records: Sequence[TrialRecord]) -> tuple[list[int], list[float]]:
        """(trial numbers, best feasible quality up to each), for the history plots; ``records`` in trial order."""
        xs, ys, best = [], [], math.inf
        for r in records:
            if r.feasible:
                best = min(best, self.quality_of(r) or math.inf)
            if math.isfinite(best):
                xs.append(r.trial)
                ys.append(best)
        return xs, ys

    def plottable(self, records: Sequence[TrialRecord]) -> list[TrialRecord]:
        """Records with a finite size and quality (others cannot be placed on an axis)."""
        return [r for r in records if self.quality_of(r) is not None and self.size_of(r) is not None]

    def unplottable(self) -> list[TrialRecord]:
        return [r for r in self.records.records if self.quality_of(r) is None or self.size_of(r) is None]

    @property
    def dense_quality(self) -> float | None:
        """The dense model's value of the quality objective (perplexity; KL to itself is 0)."""
        if self.quality == "kl":
            return 0.0
        return finite(self.records.dense.get(self.quality))

    def quality_budget(self) -> float | None:
        """The budget expressed on the quality axis, when the study has one."""
        budgets = self.records.spec.budgets
        if self.quality == "perplexity" and budgets.max_ppl_increase_pct is not None:
            dense = finite(self.records.dense.get("perplexity"))
            return None if dense is None else dense * (1 + budgets.max_ppl_increase_pct / 100)
        if self.quality == "kl" and budgets.max_kl is not None:
            return budgets.max_kl
        return None

    def heatmap_configs(self) -> list[TrialRecord]:
        """The configurations the heatmap can show: every front point (in size order), the recommended
        one if it is not on the front, then the selected trials not already listed."""
        out = list(self.front)
        if self.recommended is not None and self.recommended.trial not in self.front_trials:
            out.insert(0, self.recommended)
        listed = {r.trial for r in out}
        for record in self.selected:
            if record.trial not in listed:
                out.append(record)
                listed.add(record.trial)
        return out

    def heatmap_initial(self) -> TrialRecord | None:
        """The configuration shown first: the recommended one, else the first front point."""
        if self.recommended is not None:
            return self.recommended
        configs = self.heatmap_configs()
        return configs[0] if configs else None

    # ---- validation ----------------------------------------------------------------------
    @property
    def level_pct(self) -> str:
        level = finite((self.validation or {}).get("level"))
        return f"{100 * level:g}%" if level is not None else "95%"

    def set_names(self) -> list[str]:
        """Validation sets in display order: search, held-out, then the others as given."""
        names = list((self.validation or {}).get("sets", {}))
        for trial in self.validated.values():
            names.extend(n for n in trial.get("sets", {}) if n not in names)
        ordered = [n for n in (SEARCH_SET, HELDOUT_SET) if n in names]
        return ordered + [n for n in names if n not in ordered]

    def set_label(self, name: str) -> str:
        info = (self.validation or {}).get("sets", {}).get(name) or {}
        return str(info.get("label") or name)

    def task_names(self) -> list[str]:
        names = list(((self.validation or {}).get("dense") or {}).get("tasks", {}))
        for trial in self.validated.values():
            names.extend(n for n in trial.get("tasks", {}) if n not in names)
        return names

    def verdict(self, trial: int) -> dict[str, Any]:
        return self.validated.get(trial, {}).get("verdict") or {}

    def is_flagged(self, trial: int) -> bool:
        """Validation found the trial's search figures wrong: held-out figures that break a budget the
        search met, or a search score the rebuilt trial does not reproduce."""
        v = self.verdict(trial)
        return bool(v.get("flagged")) or v.get("reproduced") is False

    def record_of(self, trial: int) -> TrialRecord | None:
        return next((r for r in self.records.records if r.trial == trial), None)


def normalise_validation_trials(validation: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The ``trials`` of a validation dict keyed by int trial number; raises ReportError when malformed."""
    if not isinstance(validation, Mapping):
        raise ReportError(f"validation results must be a mapping, got {type(validation).__name__}")
    version = validation.get("version")
    if version != VALIDATION_VERSION:
        raise ReportError(f"validation results have version {version!r}; this report reads version {VALIDATION_VERSION}")
    trials = validation.get("trials") or {}
    if not isinstance(trials, Mapping):
        raise ReportError("validation results: 'trials' must map trial numbers to results")
    out: dict[int, dict[str, Any]] = {}
    for key, value in trials.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise ReportError(f"validation results: trial key {key!r} is not a trial number") from None
        if not isinstance(value, Mapping):
            raise ReportError(f"validation results: trial {number} must be a mapping")
        out[number] = dict(value)
    return dict(sorted(out.items()))


def build_report_data(records: StudyRecords, front: Sequence[TrialRecord], recommended: TrialRecord | None,
                      validation: Mapping[str, Any] | None, selected: Sequence[int] | None = None) -> ReportData:
    """Index the inputs of a report; an unknown ``selected`` trial raises TrialNotFoundError."""
    chosen = [find_trial(records, int(n)) for n in (selected or ())]
    return ReportData(records, list(front), recommended, dict(validation) if validation is not None else None, chosen)
