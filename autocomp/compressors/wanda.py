"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv 2306.11695).

The score of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, the magnitude scaled by the L2 norm of
input feature ``j`` over the calibration tokens; the lowest scores are pruned within each output row
(the paper's per-output comparison group) or within each N:M block. Needs calibration statistics
(``stats.input_sq_norm``, the per-input-feature sum of squares) collected on the dense model.
"""

from __future__ import annotations

import torch

from autocomp.compressors.masks import mask_from_scores
from autocomp.compressors.registry import register_compressor
from autocomp.errors import PlanError


@register_compressor("wanda", kind="prune", needs_calibration=True, prune_group="row")
def wanda_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, stats=None) -> torch.Tensor:
    """Keep-mask (``[out, in]`` bool) pruning the smallest ``|W| * ||X||``; raises PlanError without stats."""
    if stats is None or getattr(stats, "input_sq_norm", None) is None:
        raise PlanError("wanda needs calibration activations for this layer; use 'magnitude' for layers "
                        "without inputs of their own (an untied input embedding)")
    norm = stats.input_sq_norm.to(weight.device, torch.float32).sqrt()
    if norm.numel() != weight.shape[1]:
        raise PlanError(f"wanda statistics have {norm.numel()} input features, the layer has {weight.shape[1]}")
    scores = weight.abs().float() * norm.unsqueeze(0)
    return mask_from_scores(scores, sparsity, nm, per_row=True)
