"""Calibration statistics: per-layer input activation statistics on the dense model.

One pass of the calibration windows through the dense model, with forward pre-hooks on every
target's ``stats_module``, accumulates the per-input-feature sum of squares ``sum_t x_t^2`` (what
Wanda needs). Statistics are taken on the *dense* model, so every pruned variant of a layer depends
only on that layer's weight and these statistics, and stitching variants together is exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from autocomp.targets import Target


@dataclass
class LayerStats:
    input_sq_norm: torch.Tensor   # [in_features], float64 sum over calibration tokens of x_j^2
    n_tokens: int


def collect_input_stats(model: nn.Module, targets: list[Target], windows: torch.Tensor) -> dict[str, LayerStats]:
    """Run ``windows`` (``[n, seq]`` token ids) through ``model``; return stats keyed by target name."""
    by_module: dict[str, list[str]] = {}
    for t in targets:
        if t.stats_module is not None:
            by_module.setdefault(t.stats_module, []).append(t.name)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(module_name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sq = x.pow(2).sum(dim=0)
            sums[module_name] = sums[module_name] + sq if module_name in sums else sq
            counts[module_name] = counts.get(module_name, 0) + x.shape[0]
        return hook

    for module_name in by_module:
        handles.append(model.get_submodule(module_name).register_forward_pre_hook(make_hook(module_name)))
    try:
        with torch.no_grad():
            for row in windows:
                model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats: dict[str, LayerStats] = {}
    for module_name, names in by_module.items():
        for name in names:
            stats[name] = LayerStats(sums[module_name], counts[module_name])
    return stats


def stats_digest(windows: torch.Tensor, model_fingerprint: str) -> str:
    """Identifies a set of statistics: the model and the exact calibration tokens."""
    digest = hashlib.sha256(model_fingerprint.encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]
