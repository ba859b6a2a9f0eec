"""Compress one ``[out, in]`` weight according to a :class:`~autocomp.config.plan.LayerPlan`.

The pruner (if any) runs first and gives a keep-mask (a reconstructing pruner such as SparseGPT also
updates the kept weights); the quantizer (if any) then quantizes the kept weights. A joint pruner
followed by ``gptq`` quantizes inside its own pass instead. The result is deterministic: the same
weight, plan and statistics give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from autocomp.compressors.registry import CompressorEntry, get_compressor
from autocomp.compressors.rtn import QuantizedWeight
from autocomp.config.plan import LayerPlan

JOINT_QUANTIZERS = ("gptq",)


@dataclass
class CompressedWeight:
    weight: torch.Tensor                 # float, same dtype/shape as the input weight ([out, in])
    mask: torch.Tensor | None            # keep-mask when pruned
    quant: QuantizedWeight | None        # codes/scales when quantized


def method_options(entry: CompressorEntry, plan: LayerPlan) -> dict[str, Any]:
    """``{"options": <entry's options dataclass>}`` built from the plan's options, or ``{}``."""
    if entry.options is None:
        return {}
    names = {f.name for f in fields(entry.options)}
    return {"options": entry.options(**{k: v for k, v in plan.options if k in names})}


def compress_weight(weight: torch.Tensor, plan: LayerPlan, stats=None) -> CompressedWeight:
    """Apply ``plan`` to ``weight`` (``[out, in]``); raises PlanError when the layer cannot take it."""
    if plan.is_dense:
        return CompressedWeight(weight.detach().clone(), None, None)
    w = weight.detach().to(torch.float32).contiguous()
    mask = None
    quant = None
    quantizer = plan.quantizer
    if plan.pruner is not None:
        entry = get_compressor(plan.pruner)
        kwargs = method_options(entry, plan)
        joint = entry.joint and quantizer in JOINT_QUANTIZERS
        if joint:
            kwargs["quant"] = (plan.bits, plan.group_size, plan.symmetric)
        result = entry.fn(w, plan.sparsity, plan.nm, stats, **kwargs)
        if isinstance(result, torch.Tensor):
            mask = result
            w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
        else:  # a reconstructing pruner
            mask, w, quant = result.mask, result.weight, result.quant
        if joint:
            quantizer = None
    if quantizer is not None:
        entry = get_compressor(quantizer)
        quant = entry.fn(w, plan.bits, plan.group_size, plan.symmetric, mask=mask, stats=stats,
                         **method_options(entry, plan))
        w = quant.weight
    return CompressedWeight(w.to(weight.dtype).contiguous(), mask, quant)
