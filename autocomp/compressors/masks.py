"""Exact keep-masks from importance scores: unstructured (per tensor or per row) and N:M.

Selection is by rank (``topk`` over scores, ties broken by index), never by a threshold, so the
number of pruned weights is exactly the one asked for even when scores tie.
"""

from __future__ import annotations

import torch

from autocomp.errors import PlanError


def n_pruned(count: int, sparsity: float) -> int:
    """Weights to prune out of ``count`` at ``sparsity`` (rounded to nearest)."""
    return int(round(count * sparsity))


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask that prunes the lowest-scoring weights.

    ``per_row=False`` ranks over the whole tensor (magnitude pruning); ``per_row=True`` prunes
    ``round(in * sparsity)`` weights from every output row (Wanda's comparison group).
    """
    scores = scores.contiguous()
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if sparsity <= 0:
        return mask
    if per_row:
        k = n_pruned(scores.shape[1], sparsity)
        if k == 0:
            return mask
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, False)
        return mask
    flat = scores.reshape(-1)
    k = n_pruned(flat.numel(), sparsity)
    if k == 0:
        return mask
    idx = torch.topk(flat, k, largest=False, sorted=False).indices
    mask.view(-1)[idx] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every block of ``m`` consecutive input weights of each row."""
    out_f, in_f = scores.shape
    if in_f % m != 0:
        raise PlanError(f"N:M pattern {n}:{m} needs the input size to be a multiple of {m}, layer has {in_f}")
    blocks = scores.contiguous().reshape(out_f, in_f // m, m)
    keep_idx = torch.topk(blocks, n, dim=2, largest=True, sorted=False).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(2, keep_idx, True)
    return mask.reshape(out_f, in_f)


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, per_row)
