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
from typing import TYPE_CHECKING, Any, Mapping

import torch

from autocomp.cache import LayerVariantCache
from autocomp.calibration import collect_input_stats, stats_digest
from autocomp.data import Windows, eval_source, text_windows
from autocomp.evaluators.quality import DenseReference, WindowScores, score_windows
from autocomp.evaluators.size import model_size
from autocomp.models import LoadedModel, cache_root, load_model
from autocomp.objectives import ppl_increase_pct
from autocomp.plan import LayerPlan, summarize
from autocomp.spec import StudySpec
from autocomp.stitch import ModelStitcher
from autocomp.targets import Target, find_targets

if TYPE_CHECKING:
    from autocomp.study.staged import Screen


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

    def __init__(self, spec: StudySpec, loaded: LoadedModel | None = None, cache_bytes: int = 2 << 30,
                 cache_dir: str | Path | None = None) -> None:
        self.spec = spec
        self.loaded = loaded or load_model(spec.model, trust_remote_code=spec.trust_remote_code)
        model = self.loaded.model
        self.all_targets: list[Target] = find_targets(model)
        self.targets: list[Target] = spec.space.select_targets(self.all_targets)
        tok = self.loaded.tokenizer
        source, split = eval_source(spec.data, spec.calib_data)
        self.eval_windows = text_windows(tok, source, split, spec.eval_windows, random=False, bos=spec.bos)
        self.stats, self.stats_digest, self.calib_windows = {}, None, None
        self.sequential = spec.calibration_mode == "sequential"
        if self._space_needs_calibration():
            calib = spec.calibration()
            self.calib_windows = text_windows(tok, calib.data, calib.split, spec.calib_windows, random=True, bos=calib.bos)
            if not self.sequential or spec.sensitivity:  # dense statistics, once (sequential: per plan)
                self.stats = collect_input_stats(model, self.targets, self.calib_windows.input_ids,
                                                 hessian=self._space_needs_hessian())
                self.stats_digest = stats_digest(self.calib_windows.input_ids, self.loaded.fingerprint)
        self.stitcher = ModelStitcher(model, self.all_targets, self.loaded.fingerprint, self.stats,
                                      self.stats_digest, LayerVariantCache(cache_bytes, cache_dir))
        self.reference = dense_reference(model, self.loaded.fingerprint, self.eval_windows, spec.kl_topk)
        dense_size = model_size(model, self.all_targets, {})
        self.dense = DenseMetrics(self.reference.perplexity, dense_size.size_mb, dense_size.total_bytes)
        self._numels = {t.name: t.numel for t in self.targets}

    def _space_methods(self) -> list[str]:
        space = self.spec.space
        methods = []
        if any(isinstance(lv, str) or lv > 0 for lv in space.levels):
            methods += list(space.prune_methods)
        if any(b < 16 for b in space.bits):
            methods += list(space.quant_methods)
        return methods

    def _space_needs_calibration(self) -> bool:
        from autocomp.compressors.registry import compressor_needs_calibration

        return any(compressor_needs_calibration(m) for m in self._space_methods())

    def _space_needs_hessian(self) -> bool:
        from autocomp.compressors.registry import compressor_needs_hessian

        return any(compressor_needs_hessian(m) for m in self._space_methods())

    def min_size_mb(self) -> float:
        """The smallest size any configuration of the space can reach (sizes add up per layer)."""
        from autocomp.evaluators.size import layer_size

        space = self.spec.space
        best: dict[str, LayerPlan] = {}
        for t in self.targets:
            candidates = [space.layer_plan(values, data_free_only=t.stats_module is None) for values in space.group_choices()]
            best[t.name] = min(candidates, key=lambda lp: layer_size(t.out_features, t.in_features, lp).bytes)
        return model_size(self.loaded.model, self.all_targets, best).size_mb

    def kl_probe(self, windows: int = 2):
        """A callable: mean KL to the dense model of the model as it is now, on the first ``windows``
        evaluation windows (for the end-to-end sensitivity pass)."""
        k = min(windows, self.eval_windows.input_ids.shape[0])
        ids, ref = self.eval_windows.input_ids[:k], self.reference.subset(slice(0, k))

        def probe() -> float:
            return score_windows(self.loaded.model, ids, reference=ref)[0].mean_kl

        return probe

    def fisher_factors(self, max_windows: int = 16):
        """Gradient-weighted factors of the searched targets on (at most ``max_windows`` of) the
        calibration windows, for ``sensitivity: fisher`` (see :mod:`autocomp.fisher`)."""
        from autocomp.fisher import gradient_factors

        windows = self.calib_windows
        if windows is None:  # a data-free space: calibration windows only for this pass
            calib = self.spec.calibration()
            windows = text_windows(self.loaded.tokenizer, calib.data, calib.split, self.spec.calib_windows,
                                   random=True, bos=calib.bos)
        self.stitcher.apply({})
        return gradient_factors(self.loaded.model, self.targets, windows.input_ids[:max_windows], seed=self.spec.seed)

    def compress(self, plan: Mapping[str, LayerPlan]):
        """Make the in-memory model hold ``plan`` (calibrated as the study is) and return its
        accounted :class:`~autocomp.evaluators.size.SizeReport`. ``{}`` restores the dense model."""
        if self.sequential and self.calib_windows is not None and any(not lp.is_dense for lp in plan.values()):
            from autocomp.sequential import compress_sequential

            changed = [n for n, lp in plan.items() if not lp.is_dense]
            self.stitcher.prepare_external_write(changed)
            compress_sequential(self.loaded.model, self.all_targets, plan, self.calib_windows.input_ids,
                                hessian=self._space_needs_hessian())
        else:
            self.stitcher.apply(plan)
        return model_size(self.loaded.model, self.all_targets, plan)

    def evaluate(self, plan: Mapping[str, LayerPlan], screen: "Screen | None" = None) -> dict[str, float]:
        """Stitch ``plan`` into the model and return its metrics.

        With a ``screen`` (staged evaluation) the size is checked first, then the first
        ``screen.config.windows`` windows are scored and checked, and only then the rest; the screen
        raises :class:`~autocomp.study.staged.TrialPruned` to stop the candidate.
        """
        from autocomp.study.staged import estimate

        t0 = time.perf_counter()
        size = self.compress(plan)
        t1 = time.perf_counter()
        ids, ref = self.eval_windows.input_ids, self.reference
        k = screen.config.windows if screen is not None else 0
        if screen is not None:
            screen.after_size(size.size_mb)
        if screen is not None and 2 <= k < ids.shape[0]:
            first, _ = score_windows(self.loaded.model, ids[:k], reference=ref.subset(slice(0, k)))
            est = estimate(first.nll, first.tokens, first.kl, ref.nll[:k], self.dense.perplexity)
            screen.after_stage1(est, size.size_mb)
            rest, _ = score_windows(self.loaded.model, ids[k:], reference=ref.subset(slice(k, None)))
            scores = WindowScores.concat([first, rest])
        else:
            scores, _ = score_windows(self.loaded.model, ids, reference=ref)
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
