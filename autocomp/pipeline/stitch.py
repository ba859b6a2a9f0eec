"""Building a compressed model in memory by swapping in only the layers that change.

:class:`ModelStitcher` owns one loaded model. It keeps the dense weight of every target it has
touched, remembers which layer plan each target currently holds, and on :meth:`apply` rewrites only
the targets whose plan differs, taking compressed weights from a :class:`LayerVariantCache` (on disk
only for calibrated methods, whose variants are expensive; data-free ones recompute in milliseconds).
Since calibration statistics come from the dense model, a stitched model is bit-identical to
compressing the dense model from scratch with the same plan and the same dense statistics.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from autocomp.pipeline.variants import LayerVariantCache
from autocomp.pipeline.calibration import LayerStats
from autocomp.pipeline.layer import compress_weight
from autocomp.compressors.registry import compressor_needs_calibration
from autocomp.errors import PlanError
from autocomp.config.plan import DENSE, LayerPlan
from autocomp.inputs.targets import Target, get_module, read_weight, write_weight


_UNKNOWN = LayerPlan(method="magnitude", sparsity=0.999999)  # never equal to a real plan: forces a rewrite


class ModelStitcher:
    def __init__(self, model: nn.Module, targets: list[Target], fingerprint: str,
                 stats: Mapping[str, LayerStats] | None = None, stats_digest: str | None = None,
                 cache: LayerVariantCache | None = None) -> None:
        self.model = model
        self.targets = {t.name: t for t in targets}
        self.fingerprint = fingerprint
        self.stats = dict(stats or {})
        self.stats_digest = stats_digest
        self.cache = cache if cache is not None else LayerVariantCache()
        self._dense: dict[str, torch.Tensor] = {}
        self._current: dict[str, LayerPlan] = {name: DENSE for name in self.targets}

    def dense_weight(self, name: str) -> torch.Tensor:
        """The dense ``[out, in]`` weight of a target (saved the first time the target changes)."""
        if name in self._dense:
            return self._dense[name]
        return read_weight(get_module(self.model, name))

    def variant(self, name: str, plan: LayerPlan) -> torch.Tensor:
        """The compressed weight of target ``name`` under ``plan`` (cached)."""
        return self._from_cache(self.cache.get_or_compute, name, plan)

    def compressed(self, name: str, plan: LayerPlan):
        """The whole :class:`~autocomp.pipeline.layer.CompressedWeight` (codes, scales, mask) of
        target ``name`` under ``plan``: what packed export and real kernels need."""
        return self._from_cache(self.cache.get_compressed, name, plan)

    def _from_cache(self, lookup, name: str, plan: LayerPlan):
        stats = self.stats.get(name)
        key = LayerVariantCache.key(self.fingerprint, name, plan, self.stats_digest)
        dense = self.dense_weight(name)
        try:
            return lookup(key, lambda: compress_weight(dense, plan, stats),
                          persist=compressor_needs_calibration(plan.method), expect=(tuple(dense.shape), dense.dtype))
        except PlanError as exc:
            raise PlanError(f"layer {name}: {exc}") from None

    def compressed_weights(self) -> dict:
        """``{name: CompressedWeight}`` of every target the model holds compressed now."""
        unknown = [n for n, lp in self._current.items() if lp is _UNKNOWN]
        if unknown:
            raise PlanError(f"layers {unknown[:3]} were written outside the stitcher (sequential calibration); "
                            "take their compressed weights from compress_sequential's sink")
        return {name: self.compressed(name, lp) for name, lp in self._current.items() if not lp.is_dense}

    def apply(self, plan: Mapping[str, LayerPlan]) -> int:
        """Make the model hold ``plan`` (missing names: dense). Returns how many layers were rewritten."""
        unknown = set(plan) - set(self.targets)
        if unknown:
            raise PlanError(f"plan names layers that are not targets of this model: {sorted(unknown)[:5]}")
        changed = 0
        for name in self.targets:
            wanted = plan.get(name, DENSE)
            if wanted == self._current[name]:
                continue
            module = get_module(self.model, name)
            if name not in self._dense:
                self._dense[name] = read_weight(module).clone()
            new = self._dense[name] if wanted.is_dense else self.variant(name, wanted)
            write_weight(module, new)
            self._current[name] = wanted
            changed += 1
        return changed

    def prepare_external_write(self, names) -> None:
        """Make the model dense and save the dense weights of ``names``, which the caller is about to
        overwrite itself (sequential calibration); they are rewritten on the next :meth:`apply`."""
        self.apply({})
        for name in names:
            if name not in self._dense:
                self._dense[name] = read_weight(get_module(self.model, name)).clone()
            self._current[name] = _UNKNOWN

    @property
    def current(self) -> dict[str, LayerPlan]:
        return dict(self._current)
