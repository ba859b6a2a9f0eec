"""The llamacpp latency engine: a study's candidates timed as llama.cpp runs them.

A study whose space has ``deploy_target: llamacpp`` and whose latency spec names
``engine: llamacpp`` (``--latency-engine llamacpp``) measures each candidate by writing the GGUF
file ``autocomp export`` would write for it (:mod:`autocomp.exporters.gguf_file`: Q4_0 / Q5_0 / Q8_0
blocks, F16 for the rest) to a temporary folder and timing it in llama.cpp: ``warmup`` runs, then
``repeats`` timed runs of a ``prompt_len``-token prompt and ``new_tokens`` single-token steps on
random tokens, each from an empty cache, logits for the last position only; the medians are the
figures. Memory is the file's bytes (llama.cpp maps the weights) plus what the process's resident set
grew by beyond them while loading and running it (the KV cache and compute buffers).

The prediction that lets a study skip measuring a hopeless candidate (and stands in for an unmeasured
one) is a least-squares line of each time against the candidate's accounted bytes, through the
points this process measured (the dense F16 file first; one point: proportional to bytes): decode in
llama.cpp reads every weight once per token, so it is close to linear in bytes, and the error of
the prediction is reported with every measured candidate (``latency_table_error_pct``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
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


@dataclass
class _Line:
    """Least-squares ``ms = a + b * bytes`` through measured points (proportional with one point)."""

    points: list[tuple[float, float]]

    def __call__(self, x: float) -> float:
        xs, ys = zip(*self.points)
        if len(set(xs)) < 2:
            return ys[-1] * x / xs[-1] if xs[-1] > 0 else ys[-1]
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((a - mx) * (b - my) for a, b in self.points) / sum((a - mx) ** 2 for a in xs)
        return max(my + slope * (x - mx), 0.0)


class LlamaCppLatency:
    """Per-trial latency and memory in llama.cpp (module docstring); the same interface as
    :class:`~autocomp.latency.trial.LatencyEvaluator`."""

    def __init__(self, spec: LatencySpec, budgets: "Budgets", loaded: "LoadedModel", dense: "AppliedPlan",
                 dense_bytes: int, table_dir: str | Path | None = None) -> None:
        from autocomp.llamacpp.binding import lib

        lib()   # DependencyError (one line, what to install) before anything is measured
        self.spec, self.budgets, self.loaded = spec, budgets, loaded
        self.dense = self.measure_applied(dense)
        self._prefill = _Line([(float(dense_bytes), self.dense.prefill.median)])
        self._decode = _Line([(float(dense_bytes), self.dense.decode.median)])
        self._memory = _Line([(float(dense_bytes), self.dense.peak_mb)])

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

    def hopeless(self, predicted_ms: float) -> bool:
        """True when even a prediction error of ``margin`` could not bring the candidate under the budget."""
        budget = self.budgets.max_latency_ms
        return budget is not None and predicted_ms > budget * (1.0 + self.spec.margin)

    def trial_metrics(self, applied: "AppliedPlan", metrics: Mapping[str, float],
                      infeasible: bool = False) -> dict[str, float]:
        """Latency metrics of the candidate ``applied`` (accounted at ``metrics["size_bytes"]``):
        predicted always; measured unless hopeless for the budget or ``infeasible`` on another budget."""
        size = float(metrics["size_bytes"])
        prefill, decode = self._prefill(size), self._decode(size)
        predicted = decode if self.spec.metric == "decode" else prefill
        out = {"latency_predicted_ms": predicted, "prefill_predicted_ms": prefill, "decode_predicted_ms": decode}
        if infeasible or self.hopeless(predicted):
            return out | {"latency_ms": predicted, "prefill_ms": prefill, "decode_ms": decode,
                          "memory_mb": self._memory(size), "latency_measured": 0.0}
        result = self.measure_applied(applied)
        self._prefill.points.append((size, result.prefill.median))
        self._decode.points.append((size, result.decode.median))
        self._memory.points.append((size, result.peak_mb))
        measured = result.latency_ms(self.spec.metric)
        return out | result.metrics(self.spec.metric) | {
            "latency_measured": 1.0, "gguf_bytes": float(result.settings["gguf_bytes"]),
            "latency_table_error_pct": 100.0 * (predicted - measured) / measured if measured > 0 else float("nan"),
        }

    def remeasure(self, applied: "AppliedPlan") -> dict[str, Any]:
        """The re-measured front's entry for ``applied`` (:mod:`autocomp.study.remeasure`)."""
        result = self.measure_applied(applied)
        return result.metrics(self.spec.metric) | {"settings": result.settings}
