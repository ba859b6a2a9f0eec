"""The trial evaluator: one loaded model, its targets, windows, statistics and dense reference.

:class:`TrialEvaluator` is built once per process. ``evaluate(plan)`` stitches the plan into the
model in memory and runs the evaluators cheapest first: size (no forward pass), then quality
(perplexity and KL to the dense model, one forward pass per window).

The dense reference (top-k log-probs and the dense perplexity) is computed once per (model,
evaluation windows, k) and kept under ``$AUTOCOMP_CACHE/reference/``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from autocomp.cache import LayerVariantCache
from autocomp.calibration import collect_input_stats, stats_digest
from autocomp.data import Windows, eval_source, text_windows
from autocomp.evaluators.quality import DenseReference, score_windows
from autocomp.evaluators.size import model_size
from autocomp.models import LoadedModel, cache_root, load_model
from autocomp.objectives import ppl_increase_pct
from autocomp.plan import LayerPlan, summarize
from autocomp.spec import StudySpec
from autocomp.stitch import ModelStitcher
from autocomp.targets import Target, find_targets


def _reference_path(fingerprint: str, windows: Windows, k: int) -> Path:
    digest = hashlib.sha256(f"{fingerprint}:{windows.sha256}:{k}".encode()).hexdigest()[:20]
    return cache_root() / "reference" / f"{digest}.pt"


def dense_reference(model: Any, fingerprint: str, windows: Windows, k: int) -> DenseReference:
    """The dense model's top-k log-probs on ``windows`` (computed once, then read from disk)."""
    path = _reference_path(fingerprint, windows, k)
    if path.exists():
        data = torch.load(path, weights_only=True)
        return DenseReference(**data)
    _, ref = score_windows(model, windows.input_ids, topk=k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(ref)}")
    torch.save({"topk_logprobs": ref.topk_logprobs, "topk_indices": ref.topk_indices,
                "nll": ref.nll, "tokens": ref.tokens}, tmp)
    tmp.replace(path)
    return ref


@dataclass
class DenseMetrics:
    perplexity: float
    size_mb: float
    size_bytes: int


class TrialEvaluator:
    """Everything needed to score a plan; holds the model in memory between trials."""

    def __init__(self, spec: StudySpec, loaded: LoadedModel | None = None, cache_bytes: int = 2 << 30) -> None:
        self.spec = spec
        self.loaded = loaded or load_model(spec.model, trust_remote_code=spec.trust_remote_code)
        model = self.loaded.model
        self.all_targets: list[Target] = find_targets(model)
        self.targets: list[Target] = spec.space.select_targets(self.all_targets)
        tok = self.loaded.tokenizer
        source, split = eval_source(spec.data, spec.calib_data)
        self.eval_windows = text_windows(tok, source, split, spec.eval_windows, random=False, bos=spec.bos)
        self.stats, self.stats_digest = {}, None
        if self._space_needs_calibration():
            calib = spec.calibration()
            self.calib_windows = text_windows(tok, calib.data, calib.split, spec.calib_windows, random=True, bos=calib.bos)
            self.stats = collect_input_stats(model, self.targets, self.calib_windows.input_ids)
            self.stats_digest = stats_digest(self.calib_windows.input_ids, self.loaded.fingerprint)
        self.stitcher = ModelStitcher(model, self.all_targets, self.loaded.fingerprint, self.stats,
                                      self.stats_digest, LayerVariantCache(cache_bytes))
        self.reference = dense_reference(model, self.loaded.fingerprint, self.eval_windows, spec.kl_topk)
        dense_size = model_size(model, self.all_targets, {})
        self.dense = DenseMetrics(self.reference.perplexity, dense_size.size_mb, dense_size.total_bytes)
        self._numels = {t.name: t.numel for t in self.targets}

    def _space_needs_calibration(self) -> bool:
        from autocomp.compressors.registry import get_compressor

        sparse = any(isinstance(lv, str) or lv > 0 for lv in self.spec.space.levels)
        return sparse and any(get_compressor(m).needs_calibration for m in self.spec.space.prune_methods)

    def min_size_mb(self) -> float:
        """The smallest size any configuration of the space can reach (sizes add up per layer)."""
        from autocomp.evaluators.size import layer_size

        space = self.spec.space
        best: dict[str, LayerPlan] = {}
        for t in self.targets:
            candidates = []
            for level in space.levels:
                for pruner in space.prune_methods:
                    for bits in space.bits:
                        for gs in space.group_sizes:
                            for sym in space.symmetric:
                                values = {"sparsity": level, "prune": pruner, "bits": bits, "group_size": gs, "symmetric": sym}
                                candidates.append(space.layer_plan(values, data_free_only=t.stats_module is None))
            best[t.name] = min(candidates, key=lambda lp: layer_size(t.out_features, t.in_features, lp).bytes)
        return model_size(self.loaded.model, self.all_targets, best).size_mb

    def evaluate(self, plan: Mapping[str, LayerPlan]) -> dict[str, float]:
        """Stitch ``plan`` into the model and return its metrics."""
        t0 = time.perf_counter()
        self.stitcher.apply(plan)
        t1 = time.perf_counter()
        size = model_size(self.loaded.model, self.all_targets, plan)
        scores, _ = score_windows(self.loaded.model, self.eval_windows.input_ids, reference=self.reference)
        t2 = time.perf_counter()
        searched = {n: plan.get(n, LayerPlan()) for n in self._numels}
        summary = summarize(searched, self._numels)
        return {
            "perplexity": scores.perplexity,
            "kl": scores.mean_kl,
            "nll": float(scores.nll.sum() / scores.tokens.sum()),
            "ppl_increase_pct": ppl_increase_pct(scores.perplexity, self.dense.perplexity),
            "size_mb": size.size_mb,
            "size_bytes": size.total_bytes,
            "compression_ratio": size.compression_ratio,
            "avg_bits": summary["avg_bits"],
            "avg_sparsity": summary["avg_sparsity"],
            "eval_tokens": self.eval_windows.n_tokens,
            "seconds_compress": t1 - t0,
            "seconds_eval": t2 - t1,
        }
