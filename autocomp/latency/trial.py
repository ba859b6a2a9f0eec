"""Latency and memory of a compressed model as deployed: real kernels, measured end to end.

:func:`deployable_copy` turns a (simulated) compressed model into the model a deployment would run:
a copy on the target device and dtype whose compressed layers hold packed weights and run real
kernels (:mod:`autocomp.deploy.kernels`), with the layers that have no kernel on the device left as
dense float layers and listed as such. :class:`LatencyEvaluator` does what a study needs per trial:
predict latency from the lookup table (:mod:`autocomp.latency.table`), skip measuring a
candidate the prediction shows to be hopeless for the latency budget, and otherwise measure it end to
end (:func:`~autocomp.latency.timing.measure_latency`) and report the prediction's error.
"""

from __future__ import annotations

import copy
import gc
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from autocomp.latency.timing import measure_latency
from autocomp.latency.spec import LatencySpec
from autocomp.config.objectives import Budgets
from autocomp.config.plan import LayerPlan
from autocomp.inputs.targets import Target, find_decoder_blocks

if TYPE_CHECKING:
    from autocomp.inputs.models import LoadedModel
    from autocomp.pipeline.apply import AppliedPlan

MB = 1_000_000


def deployable_copy(model: nn.Module, targets: list[Target], compressed: Mapping[str, Any],
                    plans: Mapping[str, LayerPlan], spec: LatencySpec):
    """(copy of ``model`` on ``spec.device`` / ``spec.dtype`` with real kernels, materialize report)."""
    from autocomp.deploy.kernels import materialize

    spec.check_device()
    deployed = copy.deepcopy(model).to(device=spec.device, dtype=spec.torch_dtype)
    deployed.eval()
    report = materialize(deployed, targets, compressed, plans, device=spec.device, dtype=spec.torch_dtype,
                         dynamic_int8=spec.dynamic_int8)
    return deployed, report


def kernel_summary(report) -> dict[str, float]:
    """Counts of a :class:`~autocomp.deploy.kernels.MaterializeReport` as trial metrics."""
    return {"kernel_layers": float(len(report.kernel_layers)), "no_kernel_layers": float(len(report.no_kernel))}


def measure_deployed(model: nn.Module, targets: list[Target], compressed: Mapping[str, Any],
                     plans: Mapping[str, LayerPlan], spec: LatencySpec):
    """Materialise, measure, free: ``(LatencyResult, materialize report)``."""
    deployed, report = deployable_copy(model, targets, compressed, plans, spec)
    try:
        result = measure_latency(deployed, spec)
    finally:
        del deployed
        gc.collect()
        if spec.device == "cuda":
            torch.cuda.empty_cache()
    return result, report


def remeasure_entry(model: nn.Module, targets: list[Target], compressed: Mapping[str, Any],
                    plans: Mapping[str, LayerPlan], spec: LatencySpec) -> dict[str, Any]:
    """One end-to-end measurement of a front member with real kernels: its latency metrics, kernel
    counts, the layers without a kernel (and why) and the settings."""
    result, report = measure_deployed(model, targets, compressed, plans, spec)
    return result.metrics(spec.metric) | kernel_summary(report) | {"no_kernel": report.reasons(),
                                                                 "settings": result.settings}


def latency_engine(spec: LatencySpec, budgets: Budgets, loaded: "LoadedModel", dense: "AppliedPlan",
                   dense_bytes: int, table_dir: str | Path | None = None):
    """The latency engine ``spec.engine`` names, built on the dense model ``dense`` (accounted at
    ``dense_bytes``): :class:`LatencyEvaluator` (torch) or
    :class:`~autocomp.llamacpp.latency.LlamaCppLatency` (llamacpp)."""
    if spec.engine == "llamacpp":
        from autocomp.llamacpp.latency import LlamaCppLatency

        return LlamaCppLatency(spec, budgets, loaded, dense, dense_bytes, table_dir)
    return LatencyEvaluator(spec, budgets, loaded, dense, dense_bytes, table_dir)


class LatencyEvaluator:
    """Per-trial latency and memory for a study, in torch with autocomp's kernels (see module docstring).

    The latency-engine interface (:func:`latency_engine`; :class:`~autocomp.llamacpp.latency.LlamaCppLatency`
    is the other): ``dense_metrics()``, ``trial_metrics(applied, metrics, infeasible)`` and
    ``remeasure(applied)``, each given the :class:`~autocomp.pipeline.apply.AppliedPlan` to time."""

    def __init__(self, spec: LatencySpec, budgets: Budgets, loaded: "LoadedModel", dense: "AppliedPlan",
                 dense_bytes: int, table_dir: str | Path | None = None) -> None:
        from autocomp.latency.table import LatencyModel, LatencyTable

        spec.check_device()
        model, targets = dense.model, dense.targets
        self.spec, self.budgets = spec, budgets
        self.dense, _ = measure_deployed(model, targets, {}, {}, spec)
        self.dense_params = _params(model)
        self.model = LatencyModel.fit(LatencyTable(spec, table_dir), targets, _blocks(model),
                                      self.dense.prefill.median, self.dense.decode.median)

    def dense_metrics(self) -> dict[str, float]:
        return self.dense.metrics(self.spec.metric)

    def predict(self, model: nn.Module, targets: list[Target], plans: Mapping[str, LayerPlan]):
        return self.model.predict(targets, plans, _blocks(model))

    def trial_metrics(self, applied: "AppliedPlan", metrics: Mapping[str, float],
                      infeasible: bool = False) -> dict[str, float]:
        """Latency metrics of the model ``applied`` holds: predicted always; measured unless the prediction
        is hopeless for the budget or the candidate is ``infeasible`` on another budget already (its
        latency cannot make it feasible), in which case the prediction stands in (``latency_measured`` 0)."""
        model, targets, plans = applied.model, applied.targets, applied.per_layer
        pred = self.predict(model, targets, plans)
        predicted = pred.latency_ms(self.spec.metric)
        out = {"latency_predicted_ms": predicted, "prefill_predicted_ms": pred.prefill_ms,
               "decode_predicted_ms": pred.decode_ms}
        if infeasible or self.spec.hopeless(predicted, self.budgets.max_latency_ms):
            return out | {"latency_ms": predicted, "prefill_ms": pred.prefill_ms, "decode_ms": pred.decode_ms,
                          "memory_mb": self.predicted_memory_mb(model), "latency_measured": 0.0}
        result, report = measure_deployed(model, targets, applied.compressed_weights(), plans, self.spec)
        measured = result.latency_ms(self.spec.metric)
        return out | result.metrics(self.spec.metric) | kernel_summary(report) | {
            "latency_measured": 1.0,
            "latency_table_error_pct": 100.0 * (predicted - measured) / measured if measured > 0 else math.nan,
        }

    def remeasure(self, applied: "AppliedPlan") -> dict[str, Any]:
        """The re-measured front's entry for ``applied`` (:mod:`autocomp.study.remeasure`)."""
        return remeasure_entry(applied.model, applied.targets, applied.compressed_weights(), applied.per_layer,
                               self.spec)

    def predicted_memory_mb(self, model: nn.Module) -> float:
        """Stand-in memory of an unmeasured candidate: the dense run's peak scaled by parameters
        (an upper bound for compressed layers, which only shrink the weights)."""
        return self.dense.peak_mb * _params(model) / self.dense_params


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _blocks(model: nn.Module) -> int:
    return len(find_decoder_blocks(model)[1])
