"""Re-measuring the Pareto candidates of a latency study, end to end, after the search.

Latencies taken during the search are taken while other trials may share the machine (several
workers, Ray actors), and some candidates were never measured (the lookup table judged them
hopeless). Before a front is reported, every candidate on it is rebuilt from its stored plan, run
by the study's latency engine (real kernels in torch, or its GGUF file in llama.cpp) and measured
again, alone, with the study's latency settings. The result is stored per trial in the study (``autocomp_remeasured``) and from then on replaces the search's
figure wherever the study is read (:func:`autocomp.front.load_records`): a candidate whose re-measured
latency breaks the budget leaves the front, the next candidates enter it and are measured in turn,
until every member of the feasible front has a re-measured latency. Interrupted, it resumes where it
stopped. The table's prediction error over all re-measured candidates is reported.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

from autocomp.errors import StudyError
from autocomp.store.schema import REMEASURED_ATTR



@dataclass
class RemeasureOutcome:
    measured: dict[int, dict] = field(default_factory=dict)   # trial -> stored entry (this call)
    front: list = field(default_factory=list)                 # the final feasible front (TrialRecords)
    table_errors_pct: list[float] = field(default_factory=list)

    @property
    def table_error_summary(self) -> str:
        errs = [abs(e) for e in self.table_errors_pct if math.isfinite(e)]
        if not errs:
            return "no table predictions to compare"
        return (f"lookup-table prediction error over {len(errs)} re-measured candidates: "
                f"median {statistics.median(errs):.1f}%, max {max(errs):.1f}%")


def remeasure_front(storage_url: str, study_name: str, evaluator=None, echo: Callable[[str], None] = print,
                    max_rounds: int = 50, trust_remote_code: bool = False) -> RemeasureOutcome:
    """Re-measure the feasible front until all of it is re-measured (module docstring).

    ``evaluator``: a :class:`~autocomp.study.evaluate.TrialEvaluator` of this study already holding the
    model (the search's own); None loads one, which a study whose model runs its own code allows only
    with ``trust_remote_code`` (StudyError otherwise, before anything is loaded)."""
    from autocomp.front import pareto_front
    from autocomp.store.records import load_records
    from autocomp.config.plan import CompressionPlan
    from autocomp.store.schema import load_existing
    from autocomp.store.urls import open_storage

    records = load_records(storage_url, study_name)
    spec = records.spec
    if spec.latency is None:
        raise StudyError(f"study {study_name!r} does not measure latency (it was searched without latency "
                         "settings); nothing to re-measure")
    if evaluator is None:
        from autocomp.study.prepare import check_remote_code

        check_remote_code(spec, trust_remote_code, "autocomp measure", study_name)
    study = load_existing(open_storage(storage_url, must_exist=True), study_name)
    outcome = RemeasureOutcome()
    for _ in range(max_rounds):
        stored = dict(study.user_attrs.get(REMEASURED_ATTR, {}))
        front = pareto_front(records)
        todo = [r for r in front if str(r.trial) not in stored]
        outcome.front = front
        if not todo:
            break
        if evaluator is None:
            from autocomp.study.evaluate import TrialEvaluator

            echo("loading the model to re-measure the front's latency ...")
            evaluator = TrialEvaluator(spec)
        for record in todo:
            plan = CompressionPlan.from_dict(record.plan, where=f"trial {record.trial} plan")
            evaluator.compress_plan(plan)
            entry = evaluator.remeasured_latency()
            stored[str(record.trial)] = entry
            study.set_user_attr(REMEASURED_ATTR, stored)  # one by one: an interrupted run resumes
            outcome.measured[record.trial] = entry
            before = record.metrics.get("latency_ms", math.nan)
            echo(f"trial {record.trial}: re-measured {spec.latency.metric} latency {entry['latency_ms']:.4g} ms "
                 f"(search: {before:.4g} ms), peak memory {entry['memory_mb']:.4g} MB"
                 + (f", {int(entry['kernel_layers'])} layers on kernels, {int(entry['no_kernel_layers'])} without"
                    if "kernel_layers" in entry else f" ({entry['settings'].get('engine', 'torch')})"))
        evaluator.compress({})
        records = load_records(storage_url, study_name)
    else:
        raise StudyError(f"the front of study {study_name!r} kept changing after {max_rounds} rounds of re-measurement")
    outcome.table_errors_pct = table_errors(records)
    return outcome


def table_errors(records) -> list[float]:
    """Signed relative error (%) of the table's prediction against each re-measured latency."""
    out = []
    for r in records.records:
        m = r.metrics
        if m.get("latency_remeasured") and "latency_predicted_ms" in m and m.get("latency_ms", 0) > 0:
            out.append(100.0 * (m["latency_predicted_ms"] - m["latency_ms"]) / m["latency_ms"])
    return out
