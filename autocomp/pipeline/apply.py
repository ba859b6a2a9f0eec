"""Plan -> compressed model: the one path.

Every way a :class:`~autocomp.config.plan.CompressionPlan` becomes a model goes through
:class:`PlanApplier`: search trials (:class:`~autocomp.study.evaluate.TrialEvaluator`), the front's
re-measurement, validation, ``autocomp export`` and ``autocomp compress``. It holds one loaded model
(the teacher), a :class:`~autocomp.pipeline.variants.LayerVariantCache`, the calibration state of each
calibration the plans ask for, and at most one student in memory; :meth:`PlanApplier.apply` makes
the model (or the plan's student) hold the plan and returns an :class:`AppliedPlan`.

The calibration pipeline is chosen once per plan, from the plan alone (:func:`calibration_pipeline`):

* ``data_free``: no compressed layer uses a calibrated method; layers are stitched (only the ones that
  change are rewritten) and their variants computed from the weights alone;
* ``dense``: calibrated methods on the *dense* model's input statistics, collected once per
  (model, calibration windows); every variant depends only on its own layer, so layers are stitched
  and cached, and a stitched model is bit-identical to compressing from scratch;
* ``sequential``: block by block, each block calibrated on the outputs of the compressed blocks
  before it (:mod:`autocomp.pipeline.sequential`); variants depend on everything upstream, so
  nothing is stitched or cached.

A student (``plan.student``) is built from the teacher (or read from the student cache,
:mod:`autocomp.students.build`) and then compressed by the same pipelines. Its fingerprint, which keys
its layer variants, is :func:`student_fingerprint`: the same in a search and in a later export, so an
export reads the variants the search cached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from autocomp.compressors.registry import compressor_needs_calibration, compressor_needs_hessian
from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan
from autocomp.errors import PlanError
from autocomp.inputs.targets import Target, find_decoder_blocks, find_targets
from autocomp.pipeline.calibration import LayerStats, collect_input_stats, stats_digest
from autocomp.pipeline.stitch import ModelStitcher
from autocomp.pipeline.variants import LayerVariantCache

if TYPE_CHECKING:
    from autocomp.inputs.data import Windows
    from autocomp.inputs.models import LoadedModel
    from autocomp.students.spec import StudentSpec

CALIBRATION_PIPELINES = ("data_free", "dense", "sequential")

_NO_CALIBRATION = PlanError(
    "this plan uses a calibrated method but has no 'calibration' section saying which text to calibrate on; "
    "add e.g. {\"data\": \"wikitext2\", \"split\": \"validation\", \"windows\": 16, \"seq_len\": 512, \"seed\": 0}")


def calibration_pipeline(per_layer: Mapping[str, LayerPlan], calibration: CalibrationSpec | None) -> str:
    """``data_free``, ``dense`` or ``sequential`` for a resolved plan (module docstring). Raises
    PlanError when a compressed layer needs calibration and the plan names no calibration text."""
    if not any(compressor_needs_calibration(lp.method) for lp in per_layer.values() if not lp.is_dense):
        return "data_free"
    if calibration is None:
        raise _NO_CALIBRATION
    return calibration.mode


def student_fingerprint(teacher_fingerprint: str, student: "StudentSpec") -> str:
    """The fingerprint of the student built from the teacher ``teacher_fingerprint`` under ``student``:
    it keys the student's layer variants and calibration statistics."""
    return hashlib.sha256(f"{teacher_fingerprint}:student:{student.digest()}".encode()).hexdigest()[:16]


def teacher_target_name(name: str, blocks_name: str, kept_layers: tuple[int, ...]) -> str:
    """``model.layers.2.mlp.up_proj`` of a student -> the teacher's ``model.layers.<kept[2]>.mlp.up_proj``."""
    prefix = blocks_name + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{kept_layers[int(index)]}.{rest}"


@dataclass
class AppliedPlan:
    """What :meth:`PlanApplier.apply` left: the model holding the plan (the teacher, or its student),
    all of that model's targets, the per-layer plan, and which pipeline built it."""

    model: Any
    targets: list[Target]
    per_layer: dict[str, LayerPlan]
    pipeline: str
    student: "StudentSpec | None" = None
    _weights: Callable[[], dict] = field(default=dict, repr=False)

    def compressed_weights(self) -> dict:
        """``{target: CompressedWeight}`` (codes, scales, masks) of every compressed layer: what packed
        export, exporters and real kernels need."""
        return self._weights()


class _ModelState:
    """One model (the teacher or a student): its targets, its stitcher, its statistics per calibration."""

    def __init__(self, model, fingerprint: str, targets: list[Target], stats_targets: list[Target],
                 cache: LayerVariantCache) -> None:
        self.model = model
        self.fingerprint = fingerprint
        self.targets = targets
        self.stats_targets = stats_targets
        self.stitcher = ModelStitcher(model, targets, fingerprint, cache=cache)
        self.stats: dict[CalibrationSpec, tuple[dict[str, LayerStats], str, bool]] = {}
        self.sequential_weights: dict = {}
        self.calibration: CalibrationSpec | None = None   # whose statistics the stitcher holds

    def use_stats(self, calibration: CalibrationSpec, windows: "Windows", hessian: bool) -> None:
        """Give the stitcher the dense statistics of ``calibration`` (collected once; again with Hessians
        when a plan needs them and the first collection had none)."""
        stats, digest, with_hessian = self.stats.get(calibration, ({}, "", False))
        if not digest or (hessian and not with_hessian):
            self.stitcher.apply({})  # statistics are the dense model's
            stats = collect_input_stats(self.model, self.stats_targets, windows.input_ids, hessian=hessian)
            digest = stats_digest(windows.input_ids, self.fingerprint)
            self.stats[calibration] = (stats, digest, hessian)
        if self.calibration is not None and self.calibration != calibration:
            self.stitcher.apply({})  # variants made from other statistics must not stay in the model
        self.stitcher.stats, self.stitcher.stats_digest = dict(stats), digest
        self.calibration = calibration


class PlanApplier:
    """Makes one loaded model hold any plan (module docstring); keeps what plans share in memory.

    ``cache``: the layer-variant cache (default: in memory only). ``stats_targets``: the targets whose
    dense statistics are collected (default: all; a search collects only its searched targets).
    ``hessian``: collect Hessians with the first statistics even if the first plan needs none (a search
    whose space has GPTQ or SparseGPT anywhere). ``progress``: show the student build's progress.
    """

    def __init__(self, loaded: "LoadedModel", cache: LayerVariantCache | None = None,
                 stats_targets: list[Target] | None = None, hessian: bool = False, progress: bool = False) -> None:
        self.loaded = loaded
        self.cache = cache if cache is not None else LayerVariantCache()
        self.hessian = hessian
        self.progress = progress
        targets = find_targets(loaded.model)
        self.teacher = _ModelState(loaded.model, loaded.fingerprint, targets,
                                   stats_targets if stats_targets is not None else targets, self.cache)
        self._windows: dict[CalibrationSpec, "Windows"] = {}
        self._student: tuple[str, Any, _ModelState, dict[str, str]] | None = None
        self.current = AppliedPlan(loaded.model, targets, {}, "data_free")

    # ----------------------------------------------------------------------------- inputs
    def windows(self, calibration: CalibrationSpec) -> "Windows":
        """The calibration windows of ``calibration`` (tokenized once)."""
        if calibration not in self._windows:
            from autocomp.inputs.data import WindowSpec, text_windows

            self._windows[calibration] = text_windows(
                self.loaded.tokenizer, calibration.data, calibration.split,
                WindowSpec(calibration.windows, calibration.seq_len, calibration.seed), random=True, bos=calibration.bos)
        return self._windows[calibration]

    def prepare_dense_stats(self, calibration: CalibrationSpec) -> ModelStitcher:
        """Collect the teacher's dense statistics of ``calibration`` now (for the sensitivity pass,
        which compresses single layers through the stitcher) and return the teacher's stitcher."""
        self.teacher.use_stats(calibration, self.windows(calibration), self.hessian)
        return self.teacher.stitcher

    @property
    def stitcher(self) -> ModelStitcher:
        """The teacher's stitcher."""
        return self.teacher.stitcher

    # ----------------------------------------------------------------------------- students
    def student(self, spec: "StudentSpec") -> tuple[Any, _ModelState, dict[str, str]]:
        """``(built student, its state, student target -> teacher target)`` for ``spec``: built (or read
        from the student cache) once and kept until another student is asked for."""
        from autocomp.students.build import build_student

        if self._student is not None and self._student[0] == spec.digest():
            return self._student[1:]
        self._student = None  # free the previous student first
        built = build_student(self.loaded, spec, progress=self.progress)
        targets = find_targets(built.model)
        blocks_name = find_decoder_blocks(built.model)[0]
        teacher_name = {t.name: teacher_target_name(t.name, blocks_name, built.kept_layers) for t in targets}
        searched = {t.name for t in self.teacher.stats_targets}
        stats_targets = [t for t in targets if teacher_name[t.name] in searched]
        state = _ModelState(built.model, student_fingerprint(self.loaded.fingerprint, spec), targets, stats_targets,
                            self.cache)
        self._student = (spec.digest(), built, state, teacher_name)
        return built, state, teacher_name

    # ----------------------------------------------------------------------------- applying
    def resolve(self, plan: CompressionPlan) -> dict[str, LayerPlan]:
        """The plan's layer plan for every target of the model it compresses (its student's, if any)."""
        targets = self.teacher.targets if plan.student is None else self.student(plan.student)[1].targets
        return plan.resolve([t.name for t in targets if t.in_blocks], [t.name for t in targets if not t.in_blocks])

    def apply(self, plan: CompressionPlan) -> AppliedPlan:
        """Make the teacher (or the plan's student) hold ``plan``; raises PlanError for a plan this
        model cannot take."""
        return self.apply_layers(self.resolve(plan), plan.calibration, plan.student)

    def apply_layers(self, per_layer: Mapping[str, LayerPlan], calibration: CalibrationSpec | None = None,
                     student: "StudentSpec | None" = None) -> AppliedPlan:
        """:meth:`apply` for an already resolved plan (``{target: LayerPlan}``, missing targets dense),
        naming the student's modules when ``student`` is given. ``{}`` restores the dense teacher."""
        per_layer = dict(per_layer)
        pipeline = calibration_pipeline(per_layer, calibration)
        if student is not None:
            _, state, _ = self.student(student)
            if self.teacher.sequential_weights:  # the teacher was overwritten in place: restore it
                self.teacher.stitcher.apply({})
        else:
            state = self.teacher
        hessian = self.hessian or any(compressor_needs_hessian(lp.method) for lp in per_layer.values() if not lp.is_dense)
        state.sequential_weights = {}
        if pipeline == "sequential":
            from autocomp.pipeline.sequential import compress_sequential

            windows = self.windows(calibration)
            state.stitcher.prepare_external_write([n for n, lp in per_layer.items() if not lp.is_dense])
            sink: dict = {}
            compress_sequential(state.model, state.targets, per_layer, windows.input_ids, hessian=hessian, sink=sink)
            state.sequential_weights = sink
            weights: Callable[[], dict] = lambda: dict(sink)  # noqa: E731
        else:
            if pipeline == "dense":
                state.use_stats(calibration, self.windows(calibration), hessian)
            state.stitcher.apply(per_layer)
            weights = state.stitcher.compressed_weights
        self.current = AppliedPlan(state.model, state.targets, per_layer, pipeline, student, weights)
        return self.current


def apply_plan(loaded: "LoadedModel", plan: CompressionPlan, cache: LayerVariantCache | None = None) -> AppliedPlan:
    """Compress ``loaded`` under ``plan`` in place (a plan with a student puts the student in
    ``loaded.model``): the one path of :class:`PlanApplier`, for a single plan. ``cache``: the
    layer-variant cache to read and fill (an export after a search passes the search's folder)."""
    applied = PlanApplier(loaded, cache).apply(plan)
    loaded.model = applied.model
    return applied
