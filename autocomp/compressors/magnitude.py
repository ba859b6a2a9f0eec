"""Magnitude pruning: drop the weights of smallest absolute value (Han et al., 2015).

Unstructured sparsity ranks over the whole layer; N:M ranks inside each block of M input weights.
Data-free, so a pruned layer depends on its dense weight alone.
"""

from __future__ import annotations

import torch

from autocomp.compressors.masks import mask_from_scores
from autocomp.compressors.registry import register_compressor


@register_compressor("magnitude", kind="prune", prune_group="tensor")
def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, stats=None) -> torch.Tensor:
    """Keep-mask (``[out, in]`` bool) pruning the smallest ``|W|``."""
    return mask_from_scores(weight.abs(), sparsity, nm, per_row=False)
