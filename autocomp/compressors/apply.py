"""Compress one ``[out, in]`` weight according to a :class:`~autocomp.plan.LayerPlan`.

The pruner (if any) runs first and gives a keep-mask; the quantizer (if any) then quantizes the kept
weights. The result is deterministic: the same weight, plan and statistics give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocomp.compressors.registry import get_compressor
from autocomp.compressors.rtn import QuantizedWeight
from autocomp.plan import LayerPlan


@dataclass
class CompressedWeight:
    weight: torch.Tensor                 # float, same dtype/shape as the input weight ([out, in])
    mask: torch.Tensor | None            # keep-mask when pruned
    quant: QuantizedWeight | None        # codes/scales when quantized


def compress_weight(weight: torch.Tensor, plan: LayerPlan, stats=None) -> CompressedWeight:
    """Apply ``plan`` to ``weight`` (``[out, in]``); raises PlanError when the layer cannot take it."""
    if plan.is_dense:
        return CompressedWeight(weight.detach().clone(), None, None)
    w = weight.detach().to(torch.float32).contiguous()
    mask = None
    if plan.pruner is not None:
        mask = get_compressor(plan.pruner).fn(w, plan.sparsity, plan.nm, stats)
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    quant = None
    if plan.quantizer is not None:
        quant = get_compressor(plan.quantizer).fn(w, plan.bits, plan.group_size, plan.symmetric, mask=mask, stats=stats)
        w = quant.weight
    return CompressedWeight(w.to(weight.dtype).contiguous(), mask, quant)
