"""SparseGPT: massive language models can be accurately pruned in one shot.

Frantar and Alistarh, 2023 (arXiv 2301.00774). Columns are processed left to right in blocks of
``block_size``; at the start of each block the mask is chosen by the OBS saliency
``w^2 / [H^-1]_jj^2`` (adaptive mask selection), and every pruned (or quantized) weight's error is
compensated on the not yet processed columns through the Cholesky factor of ``H^-1``, as in GPTQ.

Exact counts: unstructured sparsity prunes ``round(s * out * i2) - round(s * out * i1)`` weights in
the block of columns ``[i1, i2)``, ranked over the whole block (the paper's per-block, all-rows
comparison), so the layer loses exactly ``round(s * numel)`` weights, like magnitude pruning (size
accounting: comparison group "tensor"). N:M picks the N largest saliencies in each group of M.

Joint mode (``sparsegpt+gptq``): the kept weights are quantized in the same pass (the paper's
Sec. 3.5), with GPTQ's quantizer and options. ``sparsegpt+rtn`` instead prunes and reconstructs,
then rounds the result to nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocomp.compressors.gptq import require_hessian
from autocomp.compressors.masks import n_pruned
from autocomp.compressors.obs import inverse_hessian_factor
from autocomp.compressors.registry import register_compressor
from autocomp.compressors.rtn import QuantizedWeight, group_params, quantize_codes, resolve_group_size
from autocomp.errors import PlanError


@dataclass(frozen=True)
class SparseGPTOptions:
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp < 1:
            raise PlanError(f"sparsegpt option damp must be in (0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise PlanError(f"sparsegpt option block_size must be a positive integer, got {self.block_size!r}")


@dataclass
class Pruned:
    """What a reconstructing pruner returns: the keep-mask, the updated weight, and (joint mode) its quantization."""

    mask: torch.Tensor
    weight: torch.Tensor
    quant: QuantizedWeight | None = None


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    damp: float = 0.01, block_size: int = 128,
                    quant: tuple[int, int, bool] | None = None) -> Pruned:
    """Prune (and, with ``quant=(bits, group_size, symmetric)``, quantize) ``weight`` given its Hessian."""
    W, U = inverse_hessian_factor(weight, hessian, damp)
    out_f, in_f = W.shape
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise PlanError(f"N:M pattern {n}:{m} needs the input size to be a multiple of {m}, layer has {in_f}")
        if block_size % m:
            block_size = max(m, block_size - block_size % m)
    mask = torch.ones(out_f, in_f, dtype=torch.bool)
    Q = torch.zeros_like(W)
    if quant is not None:
        bits, group_size, symmetric = quant
        gs = resolve_group_size(group_size, in_f)
        ng = -(-in_f // gs)
        scales, zeros = torch.empty(out_f, ng), torch.empty(out_f, ng)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        saliency = W1.pow(2) / torch.diag(U1).pow(2).unsqueeze(0)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:
            k = _block_quota(out_f, in_f, i1, i2, sparsity)
            if k > 0:
                idx = torch.topk(saliency.reshape(-1), k, largest=False, sorted=False).indices
                mask1.view(-1)[idx] = False
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                sal = saliency[:, i:i + nm[1]]
                drop = torch.topk(sal, nm[1] - nm[0], dim=1, largest=False, sorted=False).indices
                mask1[:, i:i + nm[1]].scatter_(1, drop, False)
            col = i1 + i
            w = W1[:, i]
            q = torch.where(mask1[:, i], w, torch.zeros((), dtype=w.dtype))
            if quant is not None:
                g = col // gs
                if col % gs == 0:
                    width = min(gs, in_f - col)
                    inside = W1[:, i:i + width]
                    group = inside if inside.shape[1] == width else torch.cat([inside, W[:, i2:i2 + width - inside.shape[1]]], 1)
                    scales[:, g], zeros[:, g] = group_params(group, bits, symmetric)
                s, z = scales[:, g], zeros[:, g]
                q = torch.where(mask1[:, i], (quantize_codes(q, s, z, bits) - z) * s, torch.zeros((), dtype=q.dtype))
            Q[:, col] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    qw = None
    if quant is not None:
        col_group = torch.arange(in_f) // gs
        s_full, z_full = scales[:, col_group], zeros[:, col_group]
        codes = quantize_codes(Q, s_full, z_full, bits)
        Q = torch.where(mask, (codes - z_full) * s_full, torch.zeros((), dtype=Q.dtype))
        qw = QuantizedWeight(Q.contiguous(), codes.to(torch.uint8), scales.to(torch.float16),
                             None if symmetric else zeros.to(torch.uint8), bits, gs)
    return Pruned(mask, Q.contiguous(), qw)


def _block_quota(out_f: int, in_f: int, i1: int, i2: int, sparsity: float) -> int:
    """Weights to prune in columns [i1, i2) so that the blocks add up to exactly round(s * numel)."""
    if sparsity <= 0:
        return 0
    total = n_pruned(out_f * in_f, sparsity)
    return round(total * i2 / in_f) - round(total * i1 / in_f)


@register_compressor("sparsegpt", kind="prune", needs_calibration=True, needs_hessian=True, prune_group="tensor",
                     options=SparseGPTOptions, joint=True)
def sparsegpt_compressor(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, stats=None,
                         options: SparseGPTOptions | None = None, quant: tuple[int, int, bool] | None = None) -> Pruned:
    """Registered entry point; needs ``stats.hessian``. ``quant`` switches on joint quantization."""
    opts = options or SparseGPTOptions()
    return sparsegpt_prune(weight, require_hessian(stats, "sparsegpt"), sparsity, nm, opts.damp, opts.block_size, quant)
