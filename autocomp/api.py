"""The Python API: the same operations as the CLI.

>>> import autocomp
>>> spec = autocomp.StudySpec(model="gemma3-270m", space=autocomp.SearchSpace.load("bits"),
...                           budgets=autocomp.Budgets(max_ppl_increase_pct=10))
>>> autocomp.search(spec, trials=20, study_name="bits-demo")          # doctest: +SKIP
>>> front = autocomp.pareto("sqlite:///results/bits-demo/study.db", "bits-demo")   # doctest: +SKIP
>>> best = autocomp.recommend("sqlite:///results/bits-demo/study.db", "bits-demo")  # doctest: +SKIP
>>> autocomp.export("sqlite:///results/bits-demo/study.db", "bits-demo", best.trial, "out/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from autocomp.errors import PlanError, StudyError
from autocomp.config.objectives import Budgets
from autocomp.front import pareto_front
from autocomp.store.records import TrialRecord, find_trial, load_records
from autocomp.front import recommend as _recommend
from autocomp.config.plan import CompressionPlan
from autocomp.config.spec import StudySpec
from autocomp.study.local import SearchOutcome, run_local
from autocomp.store.urls import default_storage_url, validate_url


def default_study_name(spec: StudySpec) -> str:
    model = Path(spec.model).stem if spec.model.endswith(".gguf") else Path(spec.model.rstrip("/")).name
    return f"{spec.space.name}-{model}"


def _variant_dir(cache_dir: str | Path | None) -> Path | None:
    from autocomp.pipeline.variants import check_writable
    from autocomp.inputs.models import cache_root

    directory = None if str(cache_dir) == "none" else Path(cache_dir) if cache_dir else cache_root() / "variants"
    if directory is not None:
        check_writable(directory)  # before the model is loaded
    return directory


def search(spec: StudySpec, trials: int, storage: str | None = None, study_name: str | None = None,
           progress: bool = True, cache_bytes: int = 2 << 30, cache_dir: str | Path | None = None,
           echo=print, ray=None) -> SearchOutcome:
    """Run or resume a study until it holds ``trials`` finished trials.

    ``cache_dir``: folder for calibrated layer variants (default ``$AUTOCOMP_CACHE/variants``;
    ``"none"`` keeps them in memory only). ``ray``: a :class:`~autocomp.study.ray_backend.RayConfig`
    to run the trials on Ray actors (``concurrency=0``: as many as the cluster fits); None runs them here.
    A study that measures latency then re-measures its front end to end (:func:`remeasure`).
    """
    study_name = study_name or default_study_name(spec)
    if storage is not None:
        validate_url(storage)
    storage = storage or default_storage_url(study_name)
    directory = _variant_dir(cache_dir)
    held: dict[str, Any] = {}
    if ray is not None:
        from autocomp.study.ray_backend import run_ray

        outcome = run_ray(spec, storage, study_name, trials, ray, progress=progress, echo=echo,
                          cache_bytes=cache_bytes, cache_dir=directory)
    else:
        from autocomp.study.evaluate import TrialEvaluator

        def factory(s: StudySpec) -> TrialEvaluator:
            held["evaluator"] = TrialEvaluator(s, cache_bytes=cache_bytes, cache_dir=directory)
            return held["evaluator"]

        outcome = run_local(spec, storage, study_name, trials, progress=progress, echo=echo, evaluator_factory=factory)
    if spec.latency is not None and outcome.completed:
        remeasure(storage, study_name, echo=echo, evaluator=held.get("evaluator"))
    return outcome


def remeasure(storage: str, study_name: str, echo=print, evaluator=None):
    """Re-measure the latency of every candidate on the study's feasible front, end to end and alone,
    until the whole front is re-measured; the figures replace the search's wherever the study is read
    (see :mod:`autocomp.study.remeasure`). Returns a
    :class:`~autocomp.study.remeasure.RemeasureOutcome`; run again to resume."""
    from autocomp.study.remeasure import remeasure_front

    outcome = remeasure_front(storage, study_name, evaluator=evaluator, echo=echo)
    echo(outcome.table_error_summary)
    return outcome


def prepare(spec: StudySpec, trials: int, storage: str | None = None, study_name: str | None = None,
            cache_bytes: int = 2 << 30, cache_dir: str | Path | None = None, echo=print) -> str:
    """Create the study (or check the stored one) with its dense figures and initial trials, run
    nothing, and return its name: :func:`worker` processes then run its ``trials``."""
    from autocomp.study.worker import StudyWorker

    if trials < 1:
        raise StudyError(f"--trials must be at least 1, got {trials}")
    study_name = study_name or default_study_name(spec)
    if storage is not None:
        validate_url(storage)
    storage = storage or default_storage_url(study_name)
    StudyWorker(storage, study_name, cache_bytes=cache_bytes, cache_dir=_variant_dir(cache_dir)).prepare(
        spec, trials, echo=echo)
    return study_name


def worker(storage: str, study_name: str, trials: int | None = None, progress: bool = True,
           cache_bytes: int = 2 << 30, cache_dir: str | Path | None = None, echo=print) -> SearchOutcome:
    """Join an existing study and run trials until it holds ``trials`` (default: its search's target)
    finished ones; any number of workers, on any machines that reach the storage, can run at once."""
    from autocomp.study.worker import run_worker

    return run_worker(storage, study_name, trials, progress=progress, echo=echo, cache_bytes=cache_bytes,
                      cache_dir=_variant_dir(cache_dir))


def pareto(storage: str, study_name: str, budgets: Budgets | None = None) -> list[TrialRecord]:
    """The feasible Pareto set (study budgets unless ``budgets`` is given), sorted by size."""
    return pareto_front(load_records(storage, study_name), budgets)


def recommend(storage: str, study_name: str, budgets: Budgets | None = None, prefer: str = "auto") -> TrialRecord | None:
    """One configuration of the feasible front under ``budgets``; None when nothing is feasible."""
    return _recommend(load_records(storage, study_name), budgets, prefer)


def validate(storage: str, study_name: str, config=None, budgets: Budgets | None = None, progress: bool = True,
             echo=print) -> dict:
    """Re-score the study's front on held-out windows, extra sets and lm-eval tasks (see
    :mod:`autocomp.validation.runner`); ``config`` is a ``ValidationConfig``. Returns the stored
    validation; run again with the same settings to resume."""
    from autocomp.validation.runner import validate_study

    return validate_study(storage, study_name, config, budgets, echo=echo, progress=progress)


def recommend_validated(storage: str, study_name: str, budgets: Budgets | None = None,
                        acc_budgets: dict[str, float] | None = None, prefer: str = "auto"):
    """(recommended trial or None, verdict per validated trial) by held-out figures; needs :func:`validate`.
    ``budgets`` / ``acc_budgets`` None: the study's budgets and the accuracy budgets stored with the validation."""
    from autocomp.validation.runner import load_validation
    from autocomp.validation.verdicts import recommend_validated as _by_heldout

    validation = load_validation(storage, study_name)
    if validation is None:
        raise StudyError(f"study {study_name!r} has no validation yet; call autocomp.validate first")
    return _by_heldout(load_records(storage, study_name), validation, budgets, acc_budgets, prefer)


def report(storage: str, study_name: str, out: str | Path) -> dict[str, Path]:
    """Write the HTML report, PNG figures and CSV/JSON data of a study into ``out``; returns the paths."""
    from autocomp.reporting import write_report
    from autocomp.validation.runner import load_validation
    from autocomp.validation.verdicts import recommend_validated as _by_heldout

    records = load_records(storage, study_name)
    front = pareto_front(records)
    validation = load_validation(storage, study_name)
    if validation is not None:
        best, _ = _by_heldout(records, validation)
    else:
        best = _recommend(records)
    return write_report(records, front, best, validation, Path(out))


def apply_plan(loaded, plan: CompressionPlan) -> dict:
    """Compress an already loaded model in place under ``plan``; returns the per-layer plan.

    A plan with a ``student`` first builds the student from the loaded model (or reads it from the
    student cache) and puts it in ``loaded.model``; the layer plans then compress the student.
    Calibrated plans rebuild their calibration windows from ``plan.calibration`` and use its mode
    (dense statistics, or sequential). Raises PlanError for a plan this model cannot take.
    """
    return _apply_plan(loaded, plan)[0]


def _apply_plan(loaded, plan: CompressionPlan):
    """:func:`apply_plan`, also returning a callable that gives every compressed layer's
    ``CompressedWeight`` (codes, scales, masks: what packed export and kernels need)."""
    from autocomp.pipeline.calibration import collect_input_stats, stats_digest
    from autocomp.inputs.data import WindowSpec, text_windows
    from autocomp.pipeline.stitch import ModelStitcher
    from autocomp.inputs.targets import find_targets

    if plan.student is not None:
        from autocomp.students.build import build_student

        student = build_student(loaded, plan.student)
        loaded.model = student.model
        loaded.fingerprint = f"{loaded.fingerprint}:student:{plan.student.digest()}"
    targets = find_targets(loaded.model)
    per_layer = plan.resolve([t.name for t in targets if t.in_blocks], [t.name for t in targets if not t.in_blocks])
    if not plan.needs_calibration():
        stitcher = ModelStitcher(loaded.model, targets, loaded.fingerprint)
        stitcher.apply(per_layer)
        return per_layer, stitcher.compressed_weights
    cal = plan.calibration
    if cal is None:
        raise PlanError("this plan uses a calibrated method but has no 'calibration' section saying which text to "
                        "calibrate on; add e.g. {\"data\": \"wikitext2\", \"split\": \"validation\", "
                        "\"windows\": 16, \"seq_len\": 512, \"seed\": 0}")
    windows = text_windows(loaded.tokenizer, cal.data, cal.split, WindowSpec(cal.windows, cal.seq_len, cal.seed),
                           random=True, bos=cal.bos)
    if cal.mode == "sequential":
        from autocomp.pipeline.sequential import compress_sequential

        sink: dict = {}
        compress_sequential(loaded.model, targets, per_layer, windows.input_ids, hessian=plan.needs_hessian(), sink=sink)
        return per_layer, lambda: sink
    stats = collect_input_stats(loaded.model, targets, windows.input_ids, hessian=plan.needs_hessian())
    digest = stats_digest(windows.input_ids, loaded.fingerprint)
    stitcher = ModelStitcher(loaded.model, targets, loaded.fingerprint, stats, digest)
    stitcher.apply(per_layer)
    return per_layer, stitcher.compressed_weights


EXPORT_FORMATS = ("packed", "float")


def compress(model: str, plan: CompressionPlan, out: str | Path, trust_remote_code: bool = False,
             provenance: dict[str, Any] | None = None, format: str = "packed", dtype: str = "float16") -> Path:
    """Apply ``plan`` to ``model`` and save the compressed model in ``out`` with ``plan.json``.

    ``format="packed"`` (default): one ``model.packed.safetensors`` holding packed low-bit codes, fp16
    scales, zero points and sparse metadata, every other tensor in ``dtype`` (16-bit): bytes on disk
    match the accounted size (:mod:`autocomp.deploy.packed_io`); :func:`autocomp.inputs.models.load_model`
    and ``autocomp search --model OUT`` read it. ``format="float"``: the dequantized weights in float32
    as a plain Hugging Face folder (``from_pretrained`` loads it; bytes on disk are not the accounted
    size). ``autocomp.json`` records both. Raises PlanError for a plan this model cannot take.
    """
    import torch

    from autocomp.evaluators.size import model_size
    from autocomp.inputs.models import load_model
    from autocomp.inputs.targets import find_targets

    if format not in EXPORT_FORMATS:
        raise PlanError(f"export format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in ("float16", "bfloat16"):
        raise PlanError(f"packed storage dtype {dtype!r} is not float16 or bfloat16 (sizes are accounted at 16 bits)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PlanError(f"output folder {out} is not empty; choose a new folder")
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    dense_bytes = model_size(loaded.model, find_targets(loaded.model), {}).total_bytes
    per_layer, compressed = _apply_plan(loaded, plan)
    targets = find_targets(loaded.model)
    size = model_size(loaded.model, targets, per_layer)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"model": model, "format": format}
    if format == "packed":
        from autocomp.deploy.packed_io import save_packed

        packed = save_packed(out, loaded.model, targets, compressed(), per_layer, dtype=getattr(torch, dtype))
        info.update({"storage_dtype": dtype, "bytes_on_disk": packed.bytes_on_disk,
                     "disk_vs_accounted_pct": 100.0 * packed.overhead})
    else:
        loaded.model.save_pretrained(out)
        info["note"] = "weights are stored dequantized in float32; the accounted size is what the packed format takes"
    loaded.tokenizer.save_pretrained(out)
    plan.save(out / "plan.json")
    size = replace(size, dense_bytes=dense_bytes)  # the ratio is to the original model (not a dense student)
    info.update({"accounted_size_bytes": size.total_bytes, "accounted_size_mb": size.size_mb,
                 "dense_size_bytes": size.dense_bytes, "compression_ratio": size.compression_ratio,
                 "params": sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())})
    info.update(provenance or {})
    (out / "autocomp.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_deployed(folder: str | Path, device: str = "cpu", dtype: str = "float32", dynamic_int8: bool = False):
    """A packed export (:func:`compress` / :func:`export`) as a deployment runs it: ``(model, report)``,
    the model on ``device`` in ``dtype`` with its compressed layers on real kernels where the device
    has them (``report``: a :class:`~autocomp.deploy.kernels.MaterializeReport` listing every layer's
    kernel, or why it has none). Raises PackedFormatError for a folder that is not a packed export."""
    import torch

    from autocomp.deploy.kernels import materialize
    from autocomp.deploy.packed_io import load_packed
    from autocomp.latency.spec import LatencySpec
    from autocomp.inputs.targets import find_targets

    LatencySpec(device=device, dtype=dtype).check_device()  # validates both, with the usual messages
    model, compressed, plans = load_packed(folder, dtype=torch.float32)
    torch_dtype = getattr(torch, dtype)
    model = model.to(device=device, dtype=torch_dtype)
    kept = {name: cw for name, cw in compressed.items() if not plans[name].is_dense}
    report = materialize(model, find_targets(model), kept, {n: plans[n] for n in kept}, device=device,
                         dtype=torch_dtype, dynamic_int8=dynamic_int8)
    return model.eval(), report


def export(storage: str, study_name: str, trial: int, out: str | Path, format: str = "packed",
           dtype: str = "float16") -> Path:
    """Rebuild trial ``trial`` of the study from its stored plan and save it like :func:`compress`."""
    records = load_records(storage, study_name)
    record = find_trial(records, trial)
    plan = CompressionPlan.from_dict(record.plan, where=f"trial {trial} plan")
    return compress(records.spec.model, plan, out, trust_remote_code=records.spec.trust_remote_code,
                    provenance={"study_name": study_name, "trial": trial, "metrics": record.metrics},
                    format=format, dtype=dtype)

