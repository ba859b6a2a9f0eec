"""Per-layer compressed variants, computed once and reused (the EvoPress "layer database").

Keys are ``(model fingerprint, layer name, canonical layer plan, statistics digest)``: everything
that determines the compressed weight. Values are the compressed ``[out, in]`` float weights. The
cache is in memory, least-recently-used, bounded by bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from autocomp.plan import LayerPlan


class LayerVariantCache:
    """LRU map from variant key to compressed weight, holding at most ``max_bytes``."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, layer: str, plan: LayerPlan, stats_digest: str | None) -> tuple:
        return (fingerprint, layer, plan.key(), stats_digest if _needs_stats(plan) else None)

    def get_or_compute(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = compute()
        size = value.numel() * value.element_size()
        if size <= self.max_bytes:
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return value

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes


def _needs_stats(plan: LayerPlan) -> bool:
    from autocomp.compressors.registry import compressor_needs_calibration

    return compressor_needs_calibration(plan.method)
