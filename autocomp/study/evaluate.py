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
from typing import TYPE_CHECKING, Any, Mapping

import torch

from autocomp.pipeline.variants import LayerVariantCache
from autocomp.pipeline.calibration import collect_input_stats, stats_digest
from autocomp.inputs.data import Windows, eval_source, text_windows
from autocomp.evaluators.quality import DenseReference, WindowScores, score_windows
from autocomp.evaluators.size import model_size
from autocomp.inputs.models import LoadedModel, cache_root, load_model
from autocomp.config.objectives import ppl_increase_pct
from autocomp.config.plan import LayerPlan, summarize
from autocomp.config.spec import StudySpec
from autocomp.pipeline.stitch import ModelStitcher
from autocomp.inputs.targets import Target, find_decoder_blocks, find_targets

if TYPE_CHECKING:
    from autocomp.config.plan import CompressionPlan
    from autocomp.students.spec import StudentSpec
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


@dataclass
class StudentState:
    """A built student held in memory with its targets and its own stitcher (for its layer plans)."""

    digest: str
    built: Any                     # autocomp.students.build.BuiltStudent
    all_targets: list[Target]
    targets: list[Target]          # the searched targets, named as the student's modules
    stitcher: ModelStitcher
    teacher_name: dict[str, str]   # student target name -> the teacher target it was built from


def teacher_target_name(name: str, blocks_name: str, kept_layers: tuple[int, ...]) -> str:
    """``model.layers.2.mlp.up_proj`` of a student -> the teacher's ``model.layers.<kept[2]>.mlp.up_proj``."""
    prefix = blocks_name + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{kept_layers[int(index)]}.{rest}"


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
        self.current_model = model          # the model holding the last compressed plan
        self._teacher_metrics = {"params": float(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())),
                                 "student_layers": float(len(find_decoder_blocks(model)[1])),
                                 "distill_steps": 0.0, "seconds_distill": 0.0}
        self._student: StudentState | None = None
        self._current_targets, self._current_plan, self._sequential_weights = self.all_targets, {}, {}
        self.latency = None
        if spec.latency is not None:
            from autocomp.latency.trial import LatencyEvaluator

            self.latency = LatencyEvaluator(spec.latency, spec.budgets, model, self.all_targets, cache_root() / "latency")
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

        windows = self.calib_windows
        if windows is None:  # a data-free space: calibration windows only for this pass
            calib = self.spec.calibration()
            windows = text_windows(self.loaded.tokenizer, calib.data, calib.split, self.spec.calib_windows,
                                   random=True, bos=calib.bos)
        self.stitcher.apply({})
        return gradient_factors(self.loaded.model, self.targets, windows.input_ids[:max_windows], seed=self.spec.seed)

    def student(self, spec: "StudentSpec") -> StudentState:
        """The student of ``spec``, built (or read from the student cache) once and kept in memory
        until another student is asked for."""
        from autocomp.students.build import build_student

        if self._student is not None and self._student.digest == spec.digest():
            return self._student
        self._student = None  # free the previous student first
        built = build_student(self.loaded, spec, progress=False)
        model = built.model
        all_targets = find_targets(model)
        blocks_name = find_decoder_blocks(model)[0]
        teacher_name = {t.name: teacher_target_name(t.name, blocks_name, built.kept_layers) for t in all_targets}
        searched = {t.name for t in self.targets}
        targets = [t for t in all_targets if teacher_name[t.name] in searched]
        stats, digest = {}, None
        fingerprint = hashlib.sha256(f"{self.loaded.fingerprint}:student:{spec.digest()}".encode()).hexdigest()[:16]
        if self.calib_windows is not None:
            stats = collect_input_stats(model, targets, self.calib_windows.input_ids, hessian=self._space_needs_hessian())
            digest = stats_digest(self.calib_windows.input_ids, fingerprint)
        stitcher = ModelStitcher(model, all_targets, fingerprint, stats, digest,
                                 LayerVariantCache(self.stitcher.cache.max_bytes, self.stitcher.cache.directory))
        self._student = StudentState(spec.digest(), built, all_targets, targets, stitcher, teacher_name)
        return self._student

    def student_plan(self, per_layer: Mapping[str, LayerPlan], spec: "StudentSpec") -> dict[str, LayerPlan]:
        """A plan over the teacher's targets carried over to the student's: each student layer takes the
        plan of the teacher layer it was built from (a dropped block's plans go with it)."""
        state = self.student(spec)
        return {t.name: per_layer.get(state.teacher_name[t.name], LayerPlan()) for t in state.targets}

    def compress_plan(self, plan: "CompressionPlan"):
        """:meth:`compress` for a stored plan (a trial's): its keys resolved against the teacher's
        targets, or against its student's when it has one."""
        targets = self.all_targets if plan.student is None else self.student(plan.student).all_targets
        per_layer = plan.resolve([t.name for t in targets if t.in_blocks], [t.name for t in targets if not t.in_blocks])
        return self.compress(per_layer, plan.student)

    def compress(self, plan: Mapping[str, LayerPlan], student: "StudentSpec | None" = None):
        """Make the in-memory model (the teacher, or the ``student`` built from it) hold ``plan``
        (calibrated as the study is) and return its accounted
        :class:`~autocomp.evaluators.size.SizeReport`; ``current_model`` is then that model.
        ``{}`` restores the dense teacher. With a student, ``plan`` names the student's modules."""
        self._current_plan = dict(plan)
        if student is not None:
            state = self.student(student)
            state.stitcher.apply(plan)
            self.current_model = state.built.model
            self._current_targets = state.all_targets
            size = model_size(self.current_model, state.all_targets, plan)
            return replace(size, dense_bytes=self.dense.size_bytes)
        self.current_model = self.loaded.model
        self._current_targets, self._sequential_weights = self.all_targets, {}
        if self.sequential and self.calib_windows is not None and any(not lp.is_dense for lp in plan.values()):
            from autocomp.pipeline.sequential import compress_sequential

            changed = [n for n, lp in plan.items() if not lp.is_dense]
            self.stitcher.prepare_external_write(changed)
            compress_sequential(self.loaded.model, self.all_targets, plan, self.calib_windows.input_ids,
                                hessian=self._space_needs_hessian(), sink=self._sequential_weights)
        else:
            self.stitcher.apply(plan)
        return model_size(self.loaded.model, self.all_targets, plan)

    def compressed_weights(self) -> dict:
        """``{target: CompressedWeight}`` (codes, scales, masks) of the model :meth:`compress` made last."""
        if self._sequential_weights:
            return dict(self._sequential_weights)
        stitcher = self._student.stitcher if self.current_model is not self.loaded.model else self.stitcher
        return stitcher.compressed_weights()

    def current(self) -> tuple[Any, list[Target], dict[str, LayerPlan]]:
        """(model, all its targets, per-layer plan) as :meth:`compress` left them."""
        return self.current_model, self._current_targets, dict(self._current_plan)

    def latency_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Latency and memory of the current model (:class:`~autocomp.latency.trial.LatencyEvaluator`);
        a candidate already over a quality or size budget is not measured, only predicted."""
        if self.latency is None:
            return {}
        quality_budgets = replace(self.spec.budgets, max_latency_ms=None, max_memory_mb=None)
        infeasible = not quality_budgets.feasible(metrics, self.dense.perplexity)
        model, targets, plan = self.current()
        return self.latency.trial_metrics(model, targets, plan, self.compressed_weights, infeasible)

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
        numels = self._numels if student is None else {t.name: t.numel for t in self._student.targets}
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
        built = self._student.built
        return {"params": float(built.n_params), "student_layers": float(len(built.kept_layers)),
                "distill_steps": float(built.spec.distill.steps), "seconds_distill": built.seconds_distill,
                "seconds_prune": built.seconds_prune, "student_cached": float(built.from_cache)}
