"""End-to-end latency and memory of a causal LM, as a deployment would run it.

One measurement (:func:`measure_latency`) runs, ``warmup`` times unrecorded and then ``repeats``
times recorded:

* **prefill**: one forward pass over a ``[batch, prompt_len]`` prompt that fills the KV cache and
  computes the logits of the last position only (as ``generate`` does);
* **decode**: ``new_tokens`` single-token forward passes on that cache. The per-token time of a
  repeat is its decode time divided by ``new_tokens``.

Tokens are fixed pseudo-random ids (seeded), so every model sees the same work. On CUDA every timed
region is bracketed by ``torch.cuda.synchronize``. Figures are the median over repeats with their
spread (min, max, interquartile range).

Memory: on CUDA the peak allocated bytes of the run (weights included, from
``torch.cuda.max_memory_allocated``); on CPU the resident weight bytes of the model (each storage
once) plus the peak increase of the process's resident set during the run (activations, KV cache,
kernel workspaces), sampled every millisecond from ``/proc/self/statm``. The device, thread count,
dtype, shapes and library versions are recorded with every result.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autocomp.errors import BudgetError
from autocomp.latency.spec import LatencySpec

MB = 1_000_000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Timing:
    """Median and spread of repeated timings, in milliseconds."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        if not samples:
            raise ValueError("no timing samples")
        s = sorted(samples)
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return cls(statistics.median(s), s[0], s[-1], q[0], q[2], len(s))

    @property
    def iqr_pct(self) -> float:
        """Interquartile range relative to the median, in percent."""
        return 100.0 * (self.q3 - self.q1) / self.median if self.median > 0 else math.inf


@dataclass(frozen=True)
class LatencyResult:
    prefill: Timing                 # ms for the whole prompt
    decode: Timing                  # ms per generated token
    model_mb: float                 # resident weight bytes (each storage once)
    work_mb: float                  # peak increase during the run (CPU: RSS; CUDA: allocator)
    peak_mb: float                  # CPU: model_mb + work_mb; CUDA: max allocated
    settings: dict[str, Any] = field(default_factory=dict)

    def latency_ms(self, metric: str) -> float:
        return self.decode.median if metric == "decode" else self.prefill.median

    def metrics(self, metric: str) -> dict[str, float]:
        """Flat trial metrics (all floats)."""
        return {"latency_ms": self.latency_ms(metric), "prefill_ms": self.prefill.median,
                "decode_ms": self.decode.median, "decode_ms_iqr_pct": self.decode.iqr_pct,
                "prefill_ms_iqr_pct": self.prefill.iqr_pct, "memory_mb": self.peak_mb,
                "model_mb": self.model_mb}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer storage of ``model``, each storage counted once, plus what
    kernel modules hold outside torch tensors (``opaque_bytes``, e.g. fbgemm's packed int8 weights) or
    inside tensor subclasses (``resident_tensors()``, e.g. 2:4 semi-structured weights)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if t is None or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    extra = 0
    for module in model.modules():
        extra += int(getattr(module, "opaque_bytes", 0) or 0)
        subclassed = [p for p in module.parameters(recurse=False) if type(p.data) is not torch.Tensor]
        if subclassed and callable(getattr(module, "resident_tensors", None)):
            for t in module.resident_tensors():
                add(t)
        for p in module.parameters(recurse=False):
            if type(p.data) is torch.Tensor:
                add(p)
        for b in module.buffers(recurse=False):
            add(b)
    return sum(seen.values()) + extra


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the process's resident set in a thread; ``peak`` is the largest seen."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s = period_s
        self.available = os.path.exists("/proc/self/statm")
        self.base = _rss_bytes() if self.available else 0
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "RssPeak":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(out) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


class _Sync:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def environment(spec: LatencySpec) -> dict[str, Any]:
    """Where and how a measurement ran (kept with every figure)."""
    info = {"device": spec.device, "threads": torch.get_num_threads(), "dtype": spec.dtype,
            "batch": spec.batch, "prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens,
            "warmup": spec.warmup, "repeats": spec.repeats, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}
    if spec.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class ThreadCount:
    """Context manager: torch's intra-op thread count set for a measurement, restored after."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._old = torch.get_num_threads()

    def __enter__(self) -> "ThreadCount":
        if self.threads:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._old)


@torch.inference_mode()
def measure_latency(model: nn.Module, spec: LatencySpec, vocab_size: int | None = None) -> LatencyResult:
    """Prefill and decode latency and peak memory of ``model`` (already on ``spec.device``)."""
    spec.check_device()
    device = torch.device(spec.device)
    vocab = int(vocab_size or getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise BudgetError("cannot measure latency: the model's config has no vocab_size")
    gen = torch.Generator().manual_seed(spec.seed)
    total = spec.prompt_len + spec.new_tokens
    ids = torch.randint(1, vocab, (spec.batch, total), generator=gen).to(device)
    prompt, continuation = ids[:, :spec.prompt_len], ids[:, spec.prompt_len:]
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"  # transformers 5 renamed it
    sync = _Sync(device)
    was_training = model.training
    model.eval()

    def run_once() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **keep)
        sync()
        t1 = time.perf_counter()
        cache = _cache_of(out)
        for i in range(spec.new_tokens):
            out = model(input_ids=continuation[:, i:i + 1], use_cache=True, **{cache_arg: cache})
            cache = _cache_of(out)
        sync()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / spec.new_tokens

    with ThreadCount(spec.threads):
        for _ in range(spec.warmup):
            run_once()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device)
        prefill, decode = [], []
        with RssPeak() as rss:
            for _ in range(spec.repeats):
                p, d = run_once()
                prefill.append(p)
                decode.append(d)
        settings = environment(spec)
    model.train(was_training)
    model_bytes = resident_bytes(model)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        work = peak - base_alloc
    else:
        work = max(0, rss.peak - rss.base)
        peak = model_bytes + work
        settings["rss_sampled"] = rss.available
    return LatencyResult(Timing.of(prefill), Timing.of(decode), model_bytes / MB, work / MB, peak / MB, settings)
