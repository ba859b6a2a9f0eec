"""Reading a study back as trial records: no model is loaded, only the storage is read.

In a latency study, the end-to-end figures re-measured after the search
(:mod:`autocomp.study.remeasure`) replace the search's own (:func:`autocomp.store.schema.overlay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from autocomp.config.spec import StudySpec
from autocomp.errors import StudyError, TrialNotFoundError
from autocomp.store.schema import DENSE_ATTR, REMEASURED_ATTR, SPEC_ATTR, load_existing, overlay
from autocomp.store.urls import mask_url, open_storage


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Stored metrics as numbers: a missing value stored as null (JSON has no NaN) reads as nan."""
    return {k: (math.nan if v is None else v) for k, v in metrics.items()}


@dataclass
class TrialRecord:
    trial: int
    metrics: dict[str, float]
    plan: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    uniform: str | None = None
    feasible: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON data: non-finite metrics are None (:func:`autocomp.jsonsafe.json_safe`)."""
        from autocomp.jsonsafe import json_safe

        return json_safe({"trial": self.trial, "metrics": self.metrics, "plan": self.plan, "uniform": self.uniform,
                          "feasible": self.feasible})

    @property
    def sound(self) -> bool:
        """True when the trial's quality figures (perplexity and KL, when stored) and size are finite
        numbers; an unsound trial (a broken model, stored before such trials were failed) is never
        feasible."""
        return all(_is_finite(self.metrics.get(name, 0.0)) for name in ("perplexity", "kl", "size_mb")) \
            and "perplexity" in self.metrics and "size_mb" in self.metrics


@dataclass
class StudyRecords:
    study_name: str
    spec: StudySpec
    dense: dict[str, float]
    records: list[TrialRecord]     # completed trials
    n_failed: int
    n_running: int


def load_records(storage_url: str, study_name: str) -> StudyRecords:
    """Every completed trial of the study with its metrics and plan, the spec and the dense figures.
    Raises StudyError when there is no such study or autocomp did not create it."""
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
            metrics = clean_metrics(dict(t.user_attrs["metrics"]))
            if str(t.number) in remeasured:
                metrics = overlay(metrics, remeasured[str(t.number)])
            records.append(TrialRecord(t.number, metrics, dict(t.user_attrs["plan"]),
                                       dict(t.params), t.user_attrs.get("uniform")))
        elif t.state == optuna.trial.TrialState.FAIL:
            failed += 1
        elif t.state == optuna.trial.TrialState.RUNNING:
            running += 1
    return StudyRecords(study_name, spec, dense, records, failed, running)


def find_trial(study: StudyRecords, number: int) -> TrialRecord:
    """The completed trial ``number``; TrialNotFoundError (naming the completed ones) otherwise."""
    for r in study.records:
        if r.trial == number:
            return r
    done = ", ".join(str(r.trial) for r in study.records[:20])
    raise TrialNotFoundError(f"trial {number} is not a completed trial of study {study.study_name!r} (completed: {done or 'none'})")
