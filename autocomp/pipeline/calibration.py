"""Calibration statistics: per-layer input activation statistics on the dense model.

One pass of the calibration windows through the dense model, with forward pre-hooks on every
target's ``stats_module``, accumulates the per-input-feature sum of squares ``sum_t x_t^2`` (what
Wanda needs) and, when asked, the input Hessian ``H = 2 X X^T / n`` (what GPTQ and SparseGPT need).

Statistics taken on the *dense* model make every compressed variant of a layer depend only on that
layer's weight and these statistics: stitching variants together is then exact for data-free
methods and for Wanda, and an approximation for GPTQ / SparseGPT, whose papers calibrate each layer
on the outputs of the already-compressed layers before it (see :mod:`autocomp.pipeline.sequential` for that
exact, slower mode).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from autocomp.inputs.targets import Target


@dataclass
class LayerStats:
    input_sq_norm: torch.Tensor          # [in_features], float64 sum over calibration tokens of x_j^2
    n_tokens: int
    hessian: torch.Tensor | None = None  # [in, in] float32, 2 X X^T / n_tokens


class StatsAccumulator:
    """Accumulates one module's input statistics over calls (``add`` a ``[..., in]`` tensor)."""

    def __init__(self, hessian: bool) -> None:
        self.want_hessian = hessian
        self.sq: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor, memo: dict | None = None) -> None:
        """Add one call's inputs. ``memo`` (cleared per forward pass by the caller) shares the work
        between modules that receive the very same input tensor (q/k/v, gate/up)."""
        key = (x.data_ptr(), tuple(x.shape), self.want_hessian)
        if memo is not None and key in memo:
            _, sq, xtx, n = memo[key]
        else:
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            sq = x2.double().pow(2).sum(dim=0)
            xtx = (x2.t() @ x2).double() if self.want_hessian else None  # float32 product, float64 sum
            n = x2.shape[0]
            if memo is not None:  # keeps x alive, so its address cannot be reused by another tensor
                memo[key] = (x, sq, xtx, n)
        self.sq = sq if self.sq is None else self.sq + sq
        if xtx is not None:
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.n += n

    def result(self) -> LayerStats:
        hessian = (2.0 * self.xtx / self.n).to(torch.float32) if self.xtx is not None else None
        return LayerStats(self.sq, self.n, hessian)


def collect_input_stats(model: nn.Module, targets: list[Target], windows: torch.Tensor,
                        hessian: bool = False) -> dict[str, LayerStats]:
    """Run ``windows`` (``[n, seq]`` token ids) through ``model``; return stats keyed by target name."""
    by_module: dict[str, list[str]] = {}
    for t in targets:
        if t.stats_module is not None:
            by_module.setdefault(t.stats_module, []).append(t.name)
    accs = {name: StatsAccumulator(hessian) for name in by_module}
    memo: dict = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda _m, inputs, acc=acc: acc.add(inputs[0], memo))
               for name, acc in accs.items()]
    try:
        with torch.no_grad():
            for row in windows:
                memo.clear()
                model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats: dict[str, LayerStats] = {}
    for module_name, names in by_module.items():
        result = accs[module_name].result()
        for name in names:
            stats[name] = result
    return stats


def stats_digest(windows: torch.Tensor, model_fingerprint: str, mode: str = "dense") -> str:
    """Identifies a set of statistics: the model, the exact calibration tokens and the mode."""
    digest = hashlib.sha256(f"{model_fingerprint}:{mode}".encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]
