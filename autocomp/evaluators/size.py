"""Exact size accounting, in bytes, of a model under a compression plan.

What a compressed target layer stores (``out x in`` weight, ``numel = out * in``):

* kept weights at ``bits`` each (16 when not quantized);
* when quantized: one fp16 scale per group (``out * ceil(in / group_size)`` groups; per channel:
  ``out`` groups) and, when asymmetric, one zero point of ``bits`` bits per group;
* when sparse: unstructured -> a bitmask of ``numel`` bits; N:M -> ``ceil(log2(M))`` index bits per
  kept weight (2:4 -> 2 bits, as in NVIDIA's sparse tensor cores);
* each layer's total is rounded up to whole bytes;
* a layer in llama.cpp's own types (methods ``ggml``, ``ggml-imatrix``): its blocks' bytes exactly
  (:mod:`autocomp.compressors.ggml`; the scales live inside the blocks).

Every other parameter (biases, norms, untouched layers, the embedding unless targeted) counts at
``base_bits`` (16: the fp16/bf16 deployment baseline, whatever dtype the model is held in for
compute). Parameters shared by several modules (a tied embedding and LM head) count once. The number
of pruned weights follows the pruner's comparison group (per tensor or per row), so sizes are
known without compressing anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from torch import nn

from autocomp.compressors.ggml import GGML_METHODS, ggml_type, row_bytes
from autocomp.compressors.masks import n_pruned
from autocomp.compressors.registry import get_compressor
from autocomp.compressors.rtn import n_groups
from autocomp.config.plan import DENSE_BITS, LayerPlan
from autocomp.inputs.targets import Target, get_module

SCALE_BITS = 16
MB = 1_000_000


def kept_weights(out_f: int, in_f: int, lp: LayerPlan) -> int:
    """Number of weights a layer keeps under ``lp`` (exactly what the pruner leaves)."""
    numel = out_f * in_f
    if lp.pruner is None:
        return numel
    if lp.nm is not None:
        n, m = lp.nm
        return out_f * (in_f // m) * n
    if get_compressor(lp.pruner).prune_group == "row":
        return out_f * (in_f - n_pruned(in_f, lp.sparsity))
    return numel - n_pruned(numel, lp.sparsity)


@dataclass(frozen=True)
class LayerSize:
    values_bits: int
    scale_bits: int
    zero_bits: int
    meta_bits: int

    @property
    def bytes(self) -> int:
        return math.ceil((self.values_bits + self.scale_bits + self.zero_bits + self.meta_bits) / 8)


def layer_size(out_f: int, in_f: int, lp: LayerPlan, base_bits: int = DENSE_BITS) -> LayerSize:
    """Bits a ``[out_f, in_f]`` weight takes under ``lp`` (see module docstring)."""
    if lp.is_dense:
        return LayerSize(out_f * in_f * base_bits, 0, 0, 0)
    if lp.quantizer in GGML_METHODS:    # llama.cpp's blocks: their bytes exactly (scales inside)
        return LayerSize(out_f * row_bytes(ggml_type(lp.bits, in_f), in_f) * 8, 0, 0, 0)
    kept = kept_weights(out_f, in_f, lp)
    value_bits = lp.bits if lp.quantizer is not None else base_bits
    scale = zero = meta = 0
    if lp.quantizer is not None:
        groups = out_f * n_groups(in_f, lp.group_size)
        scale = groups * SCALE_BITS
        zero = 0 if lp.symmetric else groups * lp.bits
    if lp.pruner is not None:
        meta = kept * math.ceil(math.log2(lp.nm[1])) if lp.nm is not None else out_f * in_f
    return LayerSize(kept * value_bits, scale, zero, meta)


@dataclass(frozen=True)
class SizeReport:
    total_bytes: int
    dense_bytes: int
    per_layer: dict[str, int]     # bytes of each target layer's weight under the plan

    @property
    def size_mb(self) -> float:
        return self.total_bytes / MB

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.total_bytes


def _unique_params(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> numel, each shared parameter once."""
    return {id(p): p.numel() for p in model.parameters()}


def model_size(model: nn.Module, targets: list[Target], plan: Mapping[str, LayerPlan],
               base_bits: int = DENSE_BITS) -> SizeReport:
    """Size of ``model`` when each target takes ``plan[name]`` (missing names stay dense)."""
    params = _unique_params(model)
    dense_bits_total = sum(params.values()) * base_bits
    other = dict(params)
    per_layer: dict[str, int] = {}
    for t in targets:
        weight = get_module(model, t.name).weight
        other.pop(id(weight), None)
        per_layer[t.name] = layer_size(t.out_features, t.in_features, plan.get(t.name, LayerPlan()), base_bits).bytes
    rest_bytes = math.ceil(sum(other.values()) * base_bits / 8)
    return SizeReport(rest_bytes + sum(per_layer.values()), math.ceil(dense_bits_total / 8), per_layer)
