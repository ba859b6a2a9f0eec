"""Round-to-nearest group quantization, simulated in float.

Each output row is cut into groups of ``group_size`` consecutive input weights (``-1``: the whole
row). A group stores integer codes ``q`` in ``[0, 2^bits - 1]``, one fp16 scale and, when
asymmetric, an integer zero point, and represents ``(q - zero) * scale``:

* asymmetric: ``scale = (max - min) / (2^bits - 1)``, ``zero = round(-min / scale)``;
* symmetric: ``scale = 2 * max|w| / (2^bits - 1)``, ``zero = 2^(bits-1)`` (fixed, not stored).

The range always includes 0 (as in GPTQ's quantizer), so zero is represented exactly and pruned
weights stay exactly zero. Scales are rounded to fp16 before use, so the simulation equals what a
packed format with fp16 scales would hold. Pruned weights (``mask == False``) are excluded from the
range and stay zero. A ragged last group (input size not a multiple of the group size) is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocomp.compressors.registry import register_compressor

_MIN_SCALE = 2.0 ** -24  # smallest positive fp16 (subnormal)


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: dequantized values plus what a packed format stores."""

    weight: torch.Tensor          # dequantized, float32, [out, in]
    codes: torch.Tensor           # uint8 codes, [out, in]
    scales: torch.Tensor          # fp16, [out, n_groups]
    zeros: torch.Tensor | None    # uint8, [out, n_groups]; None when symmetric
    bits: int
    group_size: int               # resolved: never -1
    ggml_type: str | None = None  # llama.cpp's blocks (method ggml): ``codes`` holds them, uint8 [out, row bytes]


def resolve_group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 or group_size > in_features else group_size


def n_groups(in_features: int, group_size: int) -> int:
    gs = resolve_group_size(group_size, in_features)
    return -(-in_features // gs)


def group_params(wg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded, as float32) and zero point of each group; ``wg`` is ``[..., group]``."""
    maxq = 2 ** bits - 1
    wmin = wg.amin(dim=-1).clamp(max=0.0)
    wmax = wg.amax(dim=-1).clamp(min=0.0)
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax)
        scale = 2.0 * absmax / maxq
    else:
        scale = (wmax - wmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=_MIN_SCALE)
    scale = scale.to(torch.float16).to(torch.float32)
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` under broadcastable ``scale`` / ``zero``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, in float32, pruned positions (``mask == False``) 0.

    The one dequantization of this format: element for element the arithmetic of
    :func:`group_quantize_weight`, so the variant cache, packed files and kernels that rebuild a weight
    from its codes get the simulated weight bit for bit. ``zeros`` None: symmetric (zero ``2^(bits-1)``);
    ``group_size`` resolved (never -1)."""
    in_f = codes.shape[1]
    col_group = torch.arange(in_f, device=codes.device) // group_size
    scale = scales.to(torch.float32)[:, col_group]
    zero = (zeros.to(torch.float32)[:, col_group] if zeros is not None
            else torch.full_like(scale, float(2 ** (bits - 1))))
    weight = (codes.to(torch.float32) - zero) * scale
    if mask is not None:
        weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return weight


def group_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    mask: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``weight`` (``[out, in]``) group-wise to ``bits`` with round-to-nearest."""
    w = weight.detach().to(torch.float32)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    out_f, in_f = w.shape
    gs = resolve_group_size(group_size, in_f)
    ng = -(-in_f // gs)
    pad = ng * gs - in_f
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, ng, gs)  # zero padding never widens the range
    scale, zero = group_params(wg, bits, symmetric)
    q = quantize_codes(wg, scale.unsqueeze(2), zero.unsqueeze(2), bits)
    deq = ((q - zero.unsqueeze(2)) * scale.unsqueeze(2)).reshape(out_f, ng * gs)[:, :in_f]
    codes = q.reshape(out_f, ng * gs)[:, :in_f].to(torch.uint8)
    if mask is not None:
        deq = torch.where(mask, deq, torch.zeros((), dtype=deq.dtype))
    return QuantizedWeight(
        weight=deq.contiguous(),
        codes=codes.contiguous(),
        scales=scale.to(torch.float16),
        zeros=None if symmetric else zero.to(torch.uint8),
        bits=bits,
        group_size=gs,
    )


@register_compressor("rtn", kind="quant")
def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 mask: torch.Tensor | None = None, stats=None) -> QuantizedWeight:
    """Registered entry point: round-to-nearest; ignores calibration statistics."""
    return group_quantize_weight(weight, bits, group_size, symmetric, mask)
