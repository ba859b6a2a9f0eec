"""A cheap latency model: per-layer matmul times from a lookup table, summed, plus a fitted rest.

The table maps ``(kernel, format, out x in, tokens)`` to the median time of that one layer's forward
pass on ``tokens`` rows, measured once on this device with these settings (thread count, dtype,
torch version, CPU capability) and kept on disk as JSON, so later studies on the same machine reuse
it. A model's predicted latency is

    rest_per_block * blocks + sum over targets of table[layer shape, its format, tokens]

where ``tokens`` is ``batch`` for a decode step and ``batch * prompt_len`` for prefill (the LM head
always sees ``batch`` rows: only the last position's logits are computed), a layer without a kernel
is timed as the dense float layer it runs as, and ``rest_per_block`` (attention, norms, activations,
the KV cache: everything that is not a target matmul) is fitted once from an end-to-end
measurement of the dense model. The search uses the prediction to skip measuring candidates that are
hopeless for a latency budget; every candidate it does measure reports the prediction's error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from autocomp.latency.timing import ThreadCount, Timing
from autocomp.latency.spec import LatencySpec
from autocomp.config.plan import DENSE, LayerPlan
from autocomp.inputs.targets import Target

TABLE_VERSION = 2
COLD_BYTES = 96 << 20       # timed copies of a layer together exceed this (3x the 32 MB L3 here)
COLD_COPIES_MAX = 256


@dataclass(frozen=True)
class Prediction:
    prefill_ms: float
    decode_ms: float

    def latency_ms(self, metric: str) -> float:
        return self.decode_ms if metric == "decode" else self.prefill_ms


def _timing_plan(plan: LayerPlan) -> LayerPlan:
    """A data-free plan with the same stored format as ``plan`` (timing depends on the format only)."""
    if plan.is_dense:
        return plan
    pruner = "magnitude" if plan.pruner is not None else None
    quantizer = "rtn" if plan.quantizer is not None else None
    method = "+".join(p for p in (pruner, quantizer) if p)
    return LayerPlan(method=method, sparsity=plan.sparsity, pattern=plan.pattern, bits=plan.bits,
                     group_size=plan.group_size, symmetric=plan.symmetric)


def environment_key(spec: LatencySpec) -> str:
    """Everything about where a timing was taken that changes it."""
    threads = spec.threads or torch.get_num_threads()
    parts = [spec.device, f"t{threads}", spec.dtype, torch.__version__, torch.backends.cpu.get_cpu_capability()]
    if spec.device == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    if spec.dynamic_int8:
        parts.append("dyn8")
    return "-".join(p.replace(" ", "_") for p in parts)


class LatencyTable:
    """Lookup table of per-layer times (see module docstring); ``path`` None keeps it in memory."""

    def __init__(self, spec: LatencySpec, directory: str | Path | None = None, repeats: int = 7) -> None:
        self.spec = spec
        self.repeats = repeats
        self.env = environment_key(spec)
        self.path = None
        if directory is not None:
            digest = hashlib.sha256(self.env.encode()).hexdigest()[:12]
            self.path = Path(directory) / f"latency-table-{digest}.json"
        self.entries: dict[str, float] = {}
        self.measured = 0
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == TABLE_VERSION and data.get("environment") == self.env:
                    self.entries = {k: float(v) for k, v in data["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError):
                self.entries = {}  # unreadable: measured again

    # -- one layer -------------------------------------------------------------------------------
    def kernel_of(self, plan: LayerPlan, out_f: int, in_f: int):
        from autocomp.deploy.kernels import choose_kernel

        return choose_kernel(plan, out_f, in_f, self.spec.device, dynamic_int8=self.spec.dynamic_int8)

    def _key(self, plan: LayerPlan, out_f: int, in_f: int, tokens: int) -> str:
        choice = self.kernel_of(plan, out_f, in_f)
        if choice.kernel is None or choice.kernel == "dense":  # runs as a float layer
            fmt = "dense"
        else:
            fmt = f"{choice.kernel}|{plan.bits}|{plan.group_size}|{int(plan.symmetric)}|{plan.pattern}"
        return f"{fmt}|{out_f}x{in_f}|{tokens}"

    def layer_ms(self, plan: LayerPlan, out_f: int, in_f: int, tokens: int) -> float:
        """Median time of one ``[out_f, in_f]`` layer under ``plan`` on ``tokens`` input rows."""
        key = self._key(plan, out_f, in_f, tokens)
        if key not in self.entries:
            fmt_plan = DENSE if key.startswith("dense|") else _timing_plan(plan)
            self.entries[key] = self._measure(fmt_plan, out_f, in_f, tokens)
            self.measured += 1
        return self.entries[key]

    @torch.inference_mode()
    def _measure(self, plan: LayerPlan, out_f: int, in_f: int, tokens: int) -> float:
        """Median time of one call, cycling through enough copies of the layer that their weights
        exceed the last-level cache: in a model every weight is read cold from memory once per
        token, and a single copy timed in a loop would sit in the cache (decode is memory-bound)."""
        from autocomp.pipeline.layer import compress_weight
        from autocomp.deploy.kernels import materialize

        device, dtype = torch.device(self.spec.device), self.spec.torch_dtype
        gen = torch.Generator().manual_seed(out_f * 7919 + in_f)
        weight = torch.randn(out_f, in_f, generator=gen) * 0.02
        cw = None if plan.is_dense else compress_weight(weight, plan)
        bytes_per = max(1, out_f * in_f * (plan.bits if plan.quantizer is not None else 8 * dtype.itemsize) // 8)
        copies = max(1, min(COLD_COPIES_MAX, -(-COLD_BYTES // bytes_per)))
        layers = nn.ModuleList()
        for _ in range(copies):
            holder = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
            with torch.no_grad():
                holder[0].weight.copy_(weight if cw is None else cw.weight)
            holder = holder.to(device=device, dtype=dtype)
            if cw is not None:
                target = Target("0", 0, "layer", "linear", out_f, in_f, None)
                materialize(holder, [target], {"0": cw}, {"0": plan}, device=self.spec.device, dtype=dtype,
                            dynamic_int8=self.spec.dynamic_int8)
            layers.append(holder)
        x = torch.randn(tokens, in_f, generator=gen).to(device=device, dtype=dtype)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with ThreadCount(self.spec.threads):
            for layer in layers:  # warm-up (packing, kernel selection)
                layer(x)
            sync()
            t0 = time.perf_counter()
            for layer in layers:
                layer(x)
            sync()
            once = (time.perf_counter() - t0) / copies
            rounds = max(1, min(20, int(0.01 / max(once * copies, 1e-7))))  # >= ~10 ms per sample
            samples = []
            for _ in range(self.repeats):
                sync()
                t0 = time.perf_counter()
                for _ in range(rounds):
                    for layer in layers:
                        layer(x)
                sync()
                samples.append((time.perf_counter() - t0) * 1e3 / (rounds * copies))
        return Timing.of(samples).median

    # -- a model ---------------------------------------------------------------------------------
    def matmul_ms(self, targets: list[Target], plans: Mapping[str, LayerPlan]) -> Prediction:
        """Summed target-layer times of a model under ``plans`` (missing names: dense)."""
        spec = self.spec
        decode = prefill = 0.0
        for t in targets:
            plan = plans.get(t.name, DENSE)
            if t.kind == "embedding" and not t.tied_with:
                continue  # a lookup, not a matmul
            head = not t.in_blocks
            decode += self.layer_ms(plan, t.out_features, t.in_features, spec.batch)
            rows = spec.batch if head else spec.batch * spec.prompt_len
            prefill += self.layer_ms(plan, t.out_features, t.in_features, rows)
        return Prediction(prefill, decode)

    def forget_dense(self, targets: list[Target]) -> None:
        """Drop the dense entries of these targets' shapes, so that they are measured again now (in the
        conditions of the end-to-end measurement a fit is about to use)."""
        spec = self.spec
        for t in targets:
            for tokens in (spec.batch, spec.batch * spec.prompt_len):
                self.entries.pop(self._key(DENSE, t.out_features, t.in_features, tokens), None)

    def save(self) -> None:
        """Write the table (atomically) when it has a path and new entries."""
        if self.path is None or not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": TABLE_VERSION, "environment": self.env, "entries": self.entries}
        fd, tmp = tempfile.mkstemp(prefix=".latency.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        self.measured = 0


@dataclass(frozen=True)
class LatencyModel:
    """A table plus the per-block rest fitted on the dense model's end-to-end measurement."""

    table: LatencyTable
    rest_prefill_per_block: float
    rest_decode_per_block: float

    @classmethod
    def fit(cls, table: LatencyTable, targets: list[Target], blocks: int, prefill_ms: float,
            decode_ms: float) -> "LatencyModel":
        """Fit the per-block rest on the dense model's end-to-end times; the dense layer entries are
        measured again first, so a table kept from a busier moment cannot skew the fit."""
        table.forget_dense(targets)
        dense = table.matmul_ms(targets, {})
        table.save()
        blocks = max(blocks, 1)
        return cls(table, max(0.0, prefill_ms - dense.prefill_ms) / blocks, max(0.0, decode_ms - dense.decode_ms) / blocks)

    def predict(self, targets: list[Target], plans: Mapping[str, LayerPlan], blocks: int) -> Prediction:
        mm = self.table.matmul_ms(targets, plans)
        self.table.save()
        return Prediction(mm.prefill_ms + self.rest_prefill_per_block * blocks,
                          mm.decode_ms + self.rest_decode_per_block * blocks)
