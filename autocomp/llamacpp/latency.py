"""The llamacpp latency engine: a study's candidates timed as llama.cpp runs them.

A study whose space has ``deploy_target: llamacpp`` and whose latency spec names
``engine: llamacpp`` (``--latency-engine llamacpp``) measures each candidate by writing the GGUF
file ``autocomp export`` would write for it (:mod:`autocomp.exporters.gguf_file`: autocomp's codes as
Q4_0 / Q5_0 / Q8_0 blocks or ggml's own blocks for methods ``ggml``, F16 for the rest) to a temporary folder and timing it in llama.cpp: ``warmup`` runs, then
``repeats`` timed runs of a ``prompt_len``-token prompt and ``new_tokens`` single-token steps on
random tokens, each from an empty cache, logits for the last position only; the medians are the
figures. Memory is the file's bytes (llama.cpp maps the weights) plus what the process's resident set
grew by beyond them while loading and running it (the KV cache and compute buffers).

The prediction that lets a study skip measuring a hopeless candidate (and stands in for an unmeasured
one) is :class:`BytesModel`: each time a constant plus one coefficient per GGUF type times the bytes
stored in that type, fitted to the points this process measured (the dense F16 file first) and
proportional to bytes where nothing was measured yet. Decode reads every weight once per token, but
llama.cpp's speed per byte differs by type, so the types are fitted apart. The prediction's error is
stored with every measured candidate (``latency_table_error_pct``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from autocomp.latency.spec import LatencySpec
from autocomp.latency.timing import MB, LatencyResult, RssPeak, Timing

if TYPE_CHECKING:
    from autocomp.config.objectives import Budgets
    from autocomp.inputs.models import LoadedModel
    from autocomp.pipeline.apply import AppliedPlan


def threads_of(spec: LatencySpec) -> int:
    """The thread count llama.cpp runs with (``0``: every core)."""
    return spec.threads or os.cpu_count() or 1


def measure_gguf(path: str | Path, spec: LatencySpec) -> LatencyResult:
    """Prefill and decode times (medians of ``spec.repeats`` after ``spec.warmup`` runs) and memory of
    the GGUF file at ``path`` in llama.cpp."""
    from autocomp.llamacpp.binding import lib
    from autocomp.llamacpp.runtime import LlamaCppModel, random_tokens, timed_runs

    threads = threads_of(spec)
    total = spec.prompt_len + spec.new_tokens
    file_bytes = Path(path).stat().st_size
    with RssPeak() as rss:
        with LlamaCppModel(path, total, threads, logits_all=False) as model:
            tokens = random_tokens(model.vocab, total, spec.seed)
            if spec.warmup:
                timed_runs(model, tokens, spec.prompt_len, spec.warmup)
            prefill, decode = timed_runs(model, tokens, spec.prompt_len, spec.repeats)
    # the resident set grows by the mapped weights as llama.cpp touches them, and by its KV cache and
    # compute buffers: the work is what exceeds the file
    work = max(0, rss.peak - rss.base - file_bytes)
    settings = {"engine": "llamacpp", "threads": threads, "batch": 1, "prompt_len": spec.prompt_len,
                "new_tokens": spec.new_tokens, "warmup": spec.warmup, "repeats": spec.repeats,
                "llama_cpp_python": getattr(lib(), "__version__", "?"), "cpu_count": os.cpu_count(),
                "gguf_bytes": file_bytes, "rss_sampled": rss.available}
    return LatencyResult(Timing.of(prefill), Timing.of(decode), file_bytes / MB, work / MB,
                         (file_bytes + work) / MB, settings)


def type_bytes(applied: "AppliedPlan") -> dict[str, float]:
    """Accounted bytes of ``applied``'s weight matrices by the GGUF type its export stores them in
    (F16 for dense layers)."""
    from autocomp.compressors import ggml
    from autocomp.config.plan import LayerPlan
    from autocomp.evaluators.size import layer_size
    from autocomp.exporters.gguf_file import ggml_type

    out: dict[str, float] = {}
    for t in applied.targets:
        plan = applied.per_layer.get(t.name, LayerPlan())
        if plan.quantizer is None:
            kind = "F16"
        elif plan.quantizer in ggml.GGML_METHODS:
            kind = ggml.ggml_type(plan.bits, t.in_features)
        else:
            kind = ggml_type(plan.bits, plan.symmetric) or "?"
        out[kind] = out.get(kind, 0.0) + layer_size(t.out_features, t.in_features, plan).bytes
    return out


class BytesModel:
    """A time (or memory) predicted as ``c + sum_f k_f * x_f / scale`` from byte counts ``x_f`` (per
    GGUF type, or one total), fitted to the measured points by ridge regression toward the
    proportional model (``c = 0``, every ``k_f`` the dense figure): with no measurement of a feature
    it keeps the proportional guess, and each measured point pulls the coefficients of the features
    it holds. Per type, because llama.cpp's speed per byte differs by type (measured on gemma3-270m
    at 2 threads: Q5_0 decodes 2.4x slower than Q4_0 at 1.2x the bytes)."""

    def __init__(self, scale: float, dense: float, strength: float = 1e-6) -> None:
        self.scale, self.dense, self.strength = float(scale), float(dense), strength
        self.points: list[tuple[dict[str, float], float]] = []

    def add(self, x: Mapping[str, float], value: float) -> None:
        self.points.append((dict(x), float(value)))

    def __call__(self, x: Mapping[str, float]) -> float:
        import numpy as np

        names = sorted({n for p, _ in self.points for n in p} | set(x))
        prior = np.array([0.0] + [self.dense] * len(names))

        def row(v: Mapping[str, float]):
            return np.array([1.0] + [v.get(n, 0.0) / self.scale for n in names])

        if self.points:
            X = np.stack([row(p) for p, _ in self.points])
            y = np.array([v for _, v in self.points])
            lam = self.strength * np.eye(len(prior))
            coef = np.linalg.solve(X.T @ X + lam, X.T @ y + lam @ prior)
        else:
            coef = prior
        return max(float(row(x) @ coef), 0.0)


class LlamaCppLatency:
    """Per-trial latency and memory in llama.cpp (module docstring); the same interface as
    :class:`~autocomp.latency.trial.LatencyEvaluator`."""

    def __init__(self, spec: LatencySpec, budgets: "Budgets", loaded: "LoadedModel", dense: "AppliedPlan",
                 dense_bytes: int, table_dir: str | Path | None = None) -> None:
        from autocomp.llamacpp.binding import lib

        lib()   # DependencyError (one line, what to install) before anything is measured
        self.spec, self.budgets, self.loaded = spec, budgets, loaded
        self.dense = self.measure_applied(dense)
        dense_types = type_bytes(dense)
        self._prefill = BytesModel(dense_bytes, self.dense.prefill.median)
        self._decode = BytesModel(dense_bytes, self.dense.decode.median)
        self._memory = BytesModel(dense_bytes, self.dense.peak_mb)
        self._add(dense_types, float(dense_bytes), self.dense)

    def _add(self, types: Mapping[str, float], size: float, result: LatencyResult) -> None:
        self._prefill.add(types, result.prefill.median)
        self._decode.add(types, result.decode.median)
        self._memory.add({"bytes": size}, result.peak_mb)

    def measure_applied(self, applied: "AppliedPlan") -> LatencyResult:
        """Write ``applied`` as the GGUF file ``export`` writes, time it, delete it."""
        from autocomp.exporters import ExportOptions, get_format
        from autocomp.exporters.gguf_file import GGUF_FILE

        fmt, options = get_format("gguf"), ExportOptions()
        fmt.check(applied, options)
        with tempfile.TemporaryDirectory(prefix="autocomp-latency-gguf-") as folder:
            fmt.write(Path(folder), applied, self.loaded, options)
            return measure_gguf(Path(folder) / GGUF_FILE, self.spec)

    def dense_metrics(self) -> dict[str, float]:
        return self.dense.metrics(self.spec.metric)

    def trial_metrics(self, applied: "AppliedPlan", metrics: Mapping[str, float],
                      infeasible: bool = False) -> dict[str, float]:
        """Latency metrics of the candidate ``applied`` (accounted at ``metrics["size_bytes"]``):
        predicted always; measured unless hopeless for the budget or ``infeasible`` on another budget."""
        size, types = float(metrics["size_bytes"]), type_bytes(applied)
        prefill, decode = self._prefill(types), self._decode(types)
        predicted = decode if self.spec.metric == "decode" else prefill
        out = {"latency_predicted_ms": predicted, "prefill_predicted_ms": prefill, "decode_predicted_ms": decode}
        if infeasible or self.spec.hopeless(predicted, self.budgets.max_latency_ms):
            return out | {"latency_ms": predicted, "prefill_ms": prefill, "decode_ms": decode,
                          "memory_mb": self._memory({"bytes": size}), "latency_measured": 0.0}
        result = self.measure_applied(applied)
        self._add(types, size, result)
        measured = result.latency_ms(self.spec.metric)
        return out | result.metrics(self.spec.metric) | {
            "latency_measured": 1.0, "gguf_bytes": float(result.settings["gguf_bytes"]),
            "latency_table_error_pct": 100.0 * (predicted - measured) / measured if measured > 0 else float("nan"),
        }

    def remeasure(self, applied: "AppliedPlan") -> dict[str, Any]:
        """The re-measured front's entry for ``applied`` (:mod:`autocomp.study.remeasure`)."""
        result = self.measure_applied(applied)
        return result.metrics(self.spec.metric) | {"settings": result.settings}
