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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from autocomp.config.objectives import ppl_increase_pct
from autocomp.config.plan import LayerPlan, summarize
from autocomp.config.spec import StudySpec
from autocomp.evaluators.quality import DenseReference, WindowScores, score_windows
from autocomp.evaluators.size import model_size
from autocomp.inputs.data import Windows, eval_source, text_windows
from autocomp.inputs.models import LoadedModel, cache_root, load_model
from autocomp.inputs.targets import Target, find_decoder_blocks, find_targets
from autocomp.pipeline.apply import PlanApplier
from autocomp.pipeline.stitch import ModelStitcher
from autocomp.pipeline.variants import LayerVariantCache

if TYPE_CHECKING:
    from autocomp.config.plan import CompressionPlan
    from autocomp.students.spec import StudentSpec
    from autocomp.study.staged import Screen


def cached_reference(key: str, compute: Callable[[], DenseReference]) -> DenseReference:
    """The reference named by ``key`` from ``$AUTOCOMP_CACHE/reference/``, or ``compute()`` stored
    there first (written to a temporary name and renamed, so a reader never sees half a file)."""
    path = cache_root() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.exists():
        return DenseReference(**torch.load(path, weights_only=True))
    ref = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(ref)}")
    torch.save({"topk_logprobs": ref.topk_logprobs, "topk_indices": ref.topk_indices,
                "nll": ref.nll, "tokens": ref.tokens}, tmp)
    tmp.replace(path)
    return ref


def dense_reference(model: Any, fingerprint: str, windows: Windows, k: int) -> DenseReference:
    """The dense model's top-k log-probs on ``windows`` (computed once, then read from disk)."""
    return cached_reference(f"{fingerprint}:{windows.sha256}:{k}",
                            lambda: score_windows(model, windows.input_ids, topk=k)[1])


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
        # the calibration every trial's plan names (None: a data-free space)
        self.calibration = spec.calibration() if self._space_needs_calibration() else None
        self.applier = PlanApplier(self.loaded, LayerVariantCache(cache_bytes, cache_dir), stats_targets=self.targets,
                                   hessian=self._space_needs_hessian())
        self.calib_windows = self.applier.windows(self.calibration) if self.calibration is not None else None
        if self.calibration is not None and (spec.calibration_mode != "sequential" or spec.sensitivity):
            self.applier.prepare_dense_stats(self.calibration)  # once, before the first trial
        self.reference = dense_reference(model, self.loaded.fingerprint, self.eval_windows, spec.kl_topk)
        dense_size = model_size(model, self.all_targets, {})
        self.dense = DenseMetrics(self.reference.perplexity, dense_size.size_mb, dense_size.total_bytes)
        self._numels = {t.name: t.numel for t in self.targets}
        self._teacher_metrics = {"params": float(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())),
                                 "student_layers": float(len(find_decoder_blocks(model)[1])),
                                 "distill_steps": 0.0, "seconds_distill": 0.0}
        self.latency = None
        if spec.latency is not None:
            from autocomp.latency.trial import latency_engine

            self.compress({})   # the dense model, as an applied plan
            self.latency = latency_engine(spec.latency, spec.budgets, self.loaded, self.applier.current,
                                          self.dense.size_bytes, cache_root() / "latency")
        self.teacher_dims: dict[str, int] = {}
        if spec.space.student is not None:
            from autocomp.students.prune import teacher_dims

            spec.space.student.check_teacher(model.config)
            self.teacher_dims = teacher_dims(model.config)

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
        calibration windows, for ``sensitivity: fisher`` (see :mod:`autocomp.sensitivity.fisher`)."""
        from autocomp.sensitivity.fisher import gradient_factors

        # a data-free space: calibration windows only for this pass
        windows = self.calib_windows if self.calib_windows is not None else self.applier.windows(self.spec.calibration())
        self.compress({})
        return gradient_factors(self.loaded.model, self.targets, windows.input_ids[:max_windows], seed=self.spec.seed)

    @property
    def stitcher(self) -> ModelStitcher:
        """The teacher's stitcher (the sensitivity pass compresses single layers through it)."""
        return self.applier.stitcher

    @property
    def current_model(self):
        """The model holding the plan :meth:`compress` applied last (the teacher, or a student)."""
        return self.applier.current.model

    def student_plan(self, per_layer: Mapping[str, LayerPlan], spec: "StudentSpec") -> dict[str, LayerPlan]:
        """A plan over the teacher's targets carried over to the student's: each student layer takes the
        plan of the teacher layer it was built from (a dropped block's plans go with it)."""
        _, state, teacher_name = self.applier.student(spec)
        return {t.name: per_layer.get(teacher_name[t.name], LayerPlan()) for t in state.stats_targets}

    def compress_plan(self, plan: "CompressionPlan"):
        """:meth:`compress` for a stored plan (a trial's), through the one path
        (:meth:`~autocomp.pipeline.apply.PlanApplier.apply`)."""
        return self._size(self.applier.apply(plan))

    def compress(self, plan: Mapping[str, LayerPlan], student: "StudentSpec | None" = None):
        """Make the in-memory model (the teacher, or the ``student`` built from it) hold ``plan``,
        calibrated as the study's trials are, and return its accounted
        :class:`~autocomp.evaluators.size.SizeReport`. ``{}`` restores the dense teacher. With a
        student, ``plan`` names the student's modules."""
        return self._size(self.applier.apply_layers(plan, self.calibration, student))

    def _size(self, applied):
        size = model_size(applied.model, applied.targets, applied.per_layer)
        return size if applied.student is None else replace(size, dense_bytes=self.dense.size_bytes)

    def latency_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Latency and memory of the current model in the study's latency engine
        (:func:`~autocomp.latency.trial.latency_engine`); a candidate already over a quality or size
        budget is not measured, only predicted."""
        if self.latency is None:
            return {}
        quality_budgets = replace(self.spec.budgets, max_latency_ms=None, max_memory_mb=None)
        infeasible = not quality_budgets.feasible(metrics, self.dense.perplexity)
        return self.latency.trial_metrics(self.applier.current, metrics, infeasible)

    def remeasured_latency(self) -> dict:
        """One end-to-end latency measurement of the current model, alone, for the re-measured front."""
        return self.latency.remeasure(self.applier.current)

    def evaluate(self, plan: Mapping[str, LayerPlan], screen: "Screen | None" = None,
                 student: "StudentSpec | None" = None) -> dict[str, float]:
        """Stitch ``plan`` into the model (or into the ``student``, ``plan`` then naming its modules)
        and return its metrics.

        With a ``screen`` (staged evaluation) the size is checked first, then the first
        ``screen.config.windows`` windows are scored and checked, and only then the rest; the screen
        raises :class:`~autocomp.study.staged.TrialPruned` to stop the candidate.
        """
        from autocomp.study.staged import estimate

        t0 = time.perf_counter()
        size = self.compress(plan, student)
        t1 = time.perf_counter()
        model = self.current_model
        ids, ref = self.eval_windows.input_ids, self.reference
        k = screen.config.windows if screen is not None else 0
        if screen is not None:
            screen.after_size(size.size_mb)
        if screen is not None and 2 <= k < ids.shape[0]:
            first, _ = score_windows(model, ids[:k], reference=ref.subset(slice(0, k)))
            est = estimate(first.nll, first.tokens, first.kl, ref.nll[:k], self.dense.perplexity)
            screen.after_stage1(est, size.size_mb)
            rest, _ = score_windows(model, ids[k:], reference=ref.subset(slice(k, None)))
            scores = WindowScores.concat([first, rest])
        else:
            scores, _ = score_windows(model, ids, reference=ref)
        t2 = time.perf_counter()
        numels = self._numels if student is None else {t.name: t.numel for t in self.applier.student(student)[1].stats_targets}
        searched = {n: plan.get(n, LayerPlan()) for n in numels}
        summary = summarize(searched, numels)
        extra = self._student_metrics(student)
        metrics = extra | {
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
        if self.latency is not None:
            metrics |= self.latency_metrics(metrics)
            metrics["seconds_latency"] = time.perf_counter() - t2
        return metrics

    def _student_metrics(self, student: "StudentSpec | None") -> dict[str, float]:
        """Parameters of the evaluated model and, for a student, its shape and what building it cost
        (from the cache: what it cost when it was built, so cost-aware search sees the real price)."""
        if student is None:
            return dict(self._teacher_metrics)
        built = self.applier.student(student)[0]
        return {"params": float(built.n_params), "student_layers": float(len(built.kept_layers)),
                "distill_steps": float(built.spec.distill.steps), "seconds_distill": built.seconds_distill,
                "seconds_prune": built.seconds_prune, "student_cached": float(built.from_cache)}
