"""GPTQ: accurate post-training quantization for generative transformers.

Frantar, Ashkboos, Hoefler, Alistarh, 2022 (arXiv 2210.17323). Columns are quantized one at a time;
each column's rounding error is compensated on the columns not yet quantized using the inverse
Hessian of the layer's inputs (``H = 2 X X^T / n`` from calibration data), processed in blocks of
``block_size`` columns with lazy batch updates and a Cholesky factor of ``H^-1`` for stability.

Options: ``act_order`` (quantize columns in order of decreasing ``H_jj``; group parameters are then
computed up front on the original column groups, "static groups", so the stored format is the same
as without it), ``damp`` (fraction of ``mean(diag H)`` added to the diagonal), ``block_size``.
Group parameters (fp16 scale, integer zero point) follow the same quantizer as RTN, so codes,
scales and the size accounting are shared. A keep-mask from a pruner is honoured: pruned weights are
quantized to exactly zero and their error is compensated like rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocomp.compressors.obs import inverse_hessian_factor
from autocomp.compressors.registry import register_compressor
from autocomp.compressors.rtn import QuantizedWeight, group_params, quantize_codes, resolve_group_size
from autocomp.errors import PlanError


@dataclass(frozen=True)
class GPTQOptions:
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.act_order, bool):
            raise PlanError(f"gptq option act_order must be true or false, got {self.act_order!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp < 1:
            raise PlanError(f"gptq option damp must be in (0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise PlanError(f"gptq option block_size must be a positive integer, got {self.block_size!r}")


def require_hessian(stats, method: str) -> torch.Tensor:
    hessian = getattr(stats, "hessian", None) if stats is not None else None
    if hessian is None:
        raise PlanError(f"{method} needs the layer's input Hessian from calibration data; "
                        "this layer has none (an untied input embedding has no inputs of its own): use rtn there")
    return hessian


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  mask: torch.Tensor | None = None, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` (``[out, in]``) given its input Hessian (``[in, in]``)."""
    out_f, in_f = weight.shape
    perm = torch.argsort(torch.diag(hessian.to(torch.float32)), descending=True) if act_order else torch.arange(in_f)
    H = hessian[perm][:, perm] if act_order else hessian
    W, U = inverse_hessian_factor(weight[:, perm] if act_order else weight, H, damp)
    gs = resolve_group_size(group_size, in_f)
    ng = -(-in_f // gs)
    keep = None
    if mask is not None:
        keep = mask[:, perm] if act_order else mask
        W = torch.where(keep, W, torch.zeros((), dtype=W.dtype))
    scales = torch.empty(out_f, ng)
    zeros = torch.empty(out_f, ng)
    static = act_order
    if static:  # group parameters from the original weight, per original (contiguous) column group
        W_orig = W[:, torch.argsort(perm)]
        for g in range(ng):
            scales[:, g], zeros[:, g] = group_params(W_orig[:, g * gs:(g + 1) * gs], bits, symmetric)
    Q = torch.zeros_like(W)
    cols = perm.tolist()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2] if keep is not None else None
        for i in range(i2 - i1):
            col = cols[i1 + i]
            g = col // gs
            if not static and col % gs == 0:
                # first column of a group (natural order here): fix its parameters on the updated weights
                width = min(gs, in_f - col)
                inside = W1[:, i:i + width]
                group = inside if inside.shape[1] == width else torch.cat([inside, W[:, i2:i2 + width - inside.shape[1]]], 1)
                if keep is not None:
                    group = torch.where(keep[:, i1 + i:i1 + i + width], group, torch.zeros((), dtype=group.dtype))
                scales[:, g], zeros[:, g] = group_params(group, bits, symmetric)
            w = W1[:, i]
            s, z = scales[:, g], zeros[:, g]
            q = (quantize_codes(w, s, z, bits) - z) * s
            if keep1 is not None:
                q = q * keep1[:, i]
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    # codes from the final values (exact: Q holds (code - zero) * scale)
    col_group = torch.arange(in_f) // gs
    s_full, z_full = scales[:, col_group], zeros[:, col_group]
    codes = quantize_codes(Q, s_full, z_full, bits)
    deq = (codes - z_full) * s_full
    if mask is not None:
        deq = torch.where(mask, deq, torch.zeros((), dtype=deq.dtype))
    return QuantizedWeight(deq.contiguous(), codes.to(torch.uint8), scales.to(torch.float16),
                           None if symmetric else zeros.to(torch.uint8), bits, gs)


@register_compressor("gptq", kind="quant", needs_calibration=True, needs_hessian=True, options=GPTQOptions)
def gptq_compressor(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                    mask: torch.Tensor | None = None, stats=None, options: GPTQOptions | None = None) -> QuantizedWeight:
    """Registered entry point; needs ``stats.hessian``."""
    opts = options or GPTQOptions()
    return gptq_quantize(weight, require_hessian(stats, "gptq"), bits, group_size, symmetric, mask,
                         opts.act_order, opts.damp, opts.block_size)
