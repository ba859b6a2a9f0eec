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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autocomp.errors import PlanError, StorageError, StudyError
from autocomp.config.objectives import Budgets
from autocomp.front import pareto_front
from autocomp.store.records import StudyRecords, TrialRecord, find_trial, load_records
from autocomp.front import recommend as _recommend
from autocomp.config.plan import CompressionPlan
from autocomp.config.spec import StudySpec
from autocomp.exporters.registry import DEFAULT_FORMAT
from autocomp.study.local import SearchOutcome, run_local
from autocomp.store.urls import check_study_name, default_storage_url, safe_study_name, validate_url


def default_study_name(spec: StudySpec) -> str:
    """``<space>-<model>`` with anything :func:`~autocomp.store.urls.check_study_name` refuses replaced by ``-``."""
    model = Path(spec.model).stem if spec.model.endswith(".gguf") else Path(spec.model.rstrip("/")).name
    return safe_study_name(f"{spec.space.name}-{model}")


def _study_name(spec: StudySpec, study_name: str | None) -> str:
    """The given study name (checked; an empty one is refused, not replaced) or the default one."""
    return default_study_name(spec) if study_name is None else check_study_name(study_name)


def _check_lengths(spec: StudySpec) -> None:
    """DataError when a window is longer than a local model folder's positions (read from its config
    alone, before any weights or data; other sources are checked once loaded, in prepare_study)."""
    from autocomp.inputs.data import check_window_lengths
    from autocomp.inputs.models import local_config

    config = local_config(spec.model)
    if config is not None:
        check_window_lengths(spec.sequence_lengths(), config, f"model {spec.model!r}")


def _check_cache_bytes(cache_bytes: int) -> None:
    if cache_bytes < 0:
        raise StorageError(f"--cache-mb must be >= 0 (memory for cached compressed layers), got "
                           f"{cache_bytes / (1 << 20):g}")


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
    study_name = _study_name(spec, study_name)
    _check_cache_bytes(cache_bytes)
    if storage is not None:
        validate_url(storage)
    _check_lengths(spec)
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
        remeasure(storage, study_name, echo=echo, evaluator=held.get("evaluator"),
                  trust_remote_code=spec.trust_remote_code)   # this command's own flag
    return outcome


def remeasure(storage: str, study_name: str, echo=print, evaluator=None, trust_remote_code: bool = False):
    """Re-measure the latency of every candidate on the study's feasible front, end to end and alone,
    until the whole front is re-measured; the figures replace the search's wherever the study is read
    (see :mod:`autocomp.study.remeasure`). Returns a
    :class:`~autocomp.study.remeasure.RemeasureOutcome`; run again to resume."""
    from autocomp.study.remeasure import remeasure_front

    outcome = remeasure_front(storage, study_name, evaluator=evaluator, echo=echo, trust_remote_code=trust_remote_code)
    echo(outcome.table_error_summary)
    return outcome


def prepare(spec: StudySpec, trials: int, storage: str | None = None, study_name: str | None = None,
            cache_bytes: int = 2 << 30, cache_dir: str | Path | None = None, echo=print) -> str:
    """Create the study (or check the stored one) with its dense figures and initial trials, run
    nothing, and return its name: :func:`worker` processes then run its ``trials``."""
    from autocomp.study.worker import StudyWorker

    if trials < 1:
        raise StudyError(f"--trials must be at least 1, got {trials}")
    study_name = _study_name(spec, study_name)
    _check_cache_bytes(cache_bytes)
    if storage is not None:
        validate_url(storage)
    _check_lengths(spec)
    storage = storage or default_storage_url(study_name)
    StudyWorker(storage, study_name, cache_bytes=cache_bytes, cache_dir=_variant_dir(cache_dir)).prepare(
        spec, trials, echo=echo)
    return study_name


def worker(storage: str, study_name: str, trials: int | None = None, progress: bool = True,
           cache_bytes: int = 2 << 30, cache_dir: str | Path | None = None, echo=print,
           trust_remote_code: bool = False) -> SearchOutcome:
    """Join an existing study and run trials until it holds ``trials`` (default: its search's target)
    finished ones; any number of workers, on any machines that reach the storage, can run at once.
    ``trust_remote_code`` must be given for a study whose model runs its own code (the stored spec
    alone never allows it; StudyError otherwise)."""
    from autocomp.study.worker import run_worker

    check_study_name(study_name)
    _check_cache_bytes(cache_bytes)
    return run_worker(storage, study_name, trials, progress=progress, echo=echo, cache_bytes=cache_bytes,
                      cache_dir=_variant_dir(cache_dir), trust_remote_code=trust_remote_code)


def pareto(storage: str, study_name: str, budgets: Budgets | None = None) -> list[TrialRecord]:
    """The feasible Pareto set (study budgets unless ``budgets`` is given), sorted by size."""
    return pareto_front(load_records(storage, study_name), budgets)


def recommend(storage: str, study_name: str, budgets: Budgets | None = None, prefer: str = "auto") -> TrialRecord | None:
    """One configuration of the feasible front under ``budgets``; None when nothing is feasible."""
    return _recommend(load_records(storage, study_name), budgets, prefer)


def validate(storage: str, study_name: str, config=None, budgets: Budgets | None = None, progress: bool = True,
             echo=print, trust_remote_code: bool = False) -> dict:
    """Re-score the study's front on held-out windows, extra sets and lm-eval tasks (see
    :mod:`autocomp.validation.runner`); ``config`` is a ``ValidationConfig``. Returns the stored
    validation; run again with the same settings to resume. ``trust_remote_code`` must be given for
    a study whose model runs its own code (StudyError otherwise)."""
    from autocomp.validation.runner import validate_study

    return validate_study(storage, study_name, config, budgets, echo=echo, progress=progress,
                          trust_remote_code=trust_remote_code)


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


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommendation` chose, and the evidence it chose by.

    ``by``: ``"heldout"`` (the rule of :func:`recommend_validated`, on the stored validation) or
    ``"search"`` (the rule of :func:`recommend`, on the search figures). By held-out figures
    ``validation`` is the stored validation, ``verdicts`` every validated trial's verdict and
    ``records`` the study's trials; by search figures they are None, empty and None.
    ``best`` is None when nothing is feasible. ``budgets`` / ``acc_budgets``: the budgets it chose
    under (the given ones, else the study's and those stored with the validation).
    """

    best: TrialRecord | None
    by: str
    validation: dict[str, Any] | None = None
    verdicts: dict[int, dict[str, Any]] = field(default_factory=dict)
    records: StudyRecords | None = None
    budgets: Budgets | None = None
    acc_budgets: dict[str, float] = field(default_factory=dict)


RECOMMEND_BY = ("auto", "heldout", "search")


def recommendation(storage: str, study_name: str, budgets: Budgets | None = None,
                   acc_budgets: dict[str, float] | None = None, prefer: str = "auto", by: str = "auto"
                   ) -> Recommendation:
    """One configuration under ``budgets``, chosen by held-out figures or by search figures.

    ``by="heldout"``: as :func:`recommend_validated` (raises StudyError when the study has no
    validation); ``by="search"``: as :func:`recommend`; ``by="auto"``: held-out when the study was
    validated, else search. ``budgets`` / ``acc_budgets`` None: the study's budgets and the accuracy
    budgets stored with the validation. Raises StudyError for ``acc_budgets`` without a validation.
    """
    from autocomp.store.urls import mask_url
    from autocomp.validation.runner import load_validation
    from autocomp.validation.verdicts import recommend_validated as _by_heldout

    if by not in RECOMMEND_BY:
        raise StudyError(f"by={by!r} is not one of {', '.join(RECOMMEND_BY)}")
    validation = load_validation(storage, study_name) if by != "search" else None
    if by == "heldout" and validation is None:
        raise StudyError(f"study {study_name!r} has no validation yet; run autocomp validate --storage "
                         f"{mask_url(storage)} --study-name {study_name} first, or use --by search")
    if acc_budgets and validation is None:
        raise StudyError("--max-acc-drop needs a validated study (autocomp validate --tasks ...)")
    records = load_records(storage, study_name)
    used = records.spec.budgets if budgets is None else budgets
    if validation is None:
        return Recommendation(_recommend(records, budgets, prefer), by="search", budgets=used)
    best, judged = _by_heldout(records, validation, budgets, acc_budgets, prefer)
    acc = dict(validation.get("acc_budgets", {}) if acc_budgets is None else acc_budgets)
    return Recommendation(best, by="heldout", validation=validation, verdicts=judged, records=records, budgets=used,
                          acc_budgets=acc)


def study_location(spec: StudySpec, storage: str | None = None, study_name: str | None = None) -> tuple[str, str]:
    """``(storage URL, study name)`` that :func:`search` and :func:`prepare` use for ``spec``: the
    given ones, else :func:`default_study_name` and its default storage under ``results/``.
    Raises StorageError for a malformed ``storage``, StudyError for a study name that
    :func:`~autocomp.store.urls.check_study_name` refuses."""
    if storage is not None:
        validate_url(storage)
    study_name = _study_name(spec, study_name)
    return storage or default_storage_url(study_name), study_name


def builtin_spaces() -> list:
    """The built-in search spaces (:class:`~autocomp.config.space.SearchSpace`), by file name."""
    from autocomp.config.space import BUILTIN_DIR, SearchSpace

    return [SearchSpace.load(path) for path in sorted(BUILTIN_DIR.glob("*.yaml"))]


@dataclass(frozen=True)
class VariantCacheUsage:
    """What a layer-variant folder holds: ``variants`` files of ``bytes`` in all, counted before any
    pruning; ``removed`` / ``freed_bytes``: what pruning deleted. ``exists`` False: no folder yet."""

    folder: Path
    exists: bool
    variants: int = 0
    bytes: int = 0
    removed: int = 0
    freed_bytes: int = 0


def variant_cache_usage(directory: str | Path | None = None, max_bytes: int | None = None) -> VariantCacheUsage:
    """Count the calibrated layer variants cached in ``directory`` (default ``$AUTOCOMP_CACHE/variants``)
    and, with ``max_bytes``, delete the least recently used until the folder holds at most that many
    bytes (safe while searches use it; only files the cache wrote are ever deleted). Raises
    StorageError for a negative ``max_bytes``, a ``directory`` that is a file, or a folder that is not
    a variant cache (no marker: :data:`autocomp.pipeline.variants.MARKER`)."""
    from autocomp.errors import StorageError
    from autocomp.inputs.models import cache_root
    from autocomp.pipeline.variants import LayerVariantCache

    folder = Path(directory) if directory else cache_root() / "variants"
    if max_bytes is not None and max_bytes < 0:
        raise StorageError(f"the variant cache size limit must be >= 0 bytes, got {max_bytes}")
    if not folder.is_dir():
        if folder.exists():
            raise StorageError(f"{folder} is not a folder; pass --dir with the variant cache folder")
        return VariantCacheUsage(folder, exists=False)
    cache = LayerVariantCache(directory=folder, create=False)
    entries = cache.disk_entries()
    removed, freed = cache.prune_disk(max_bytes) if max_bytes is not None else (0, 0)
    return VariantCacheUsage(folder, True, len(entries), sum(e[1] for e in entries), removed, freed)


def dashboard(storage: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard for every study in ``storage`` at ``http://host:port/`` until stopped
    (Ctrl-C); see :func:`autocomp.reporting.dashboard.run_dashboard` for what it raises."""
    from autocomp.reporting.dashboard import run_dashboard

    run_dashboard(storage, host, port)


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


def apply_plan(loaded, plan: CompressionPlan, cache_dir: str | Path | None = "none"):
    """Compress an already loaded model in place under ``plan`` through the one path
    (:func:`autocomp.pipeline.apply.apply_plan`); returns its
    :class:`~autocomp.pipeline.apply.AppliedPlan` (model, targets, per-layer plan, compressed weights).

    A plan with a ``student`` first builds the student from the loaded model (or reads it from the
    student cache) and puts it in ``loaded.model``; the layer plans then compress the student.
    ``cache_dir``: the layer-variant folder to read and fill (``"none"``: memory only; None: the
    default ``$AUTOCOMP_CACHE/variants`` that searches use). Raises PlanError for a plan this model
    cannot take.
    """
    from autocomp.pipeline.apply import apply_plan as _apply
    from autocomp.pipeline.variants import LayerVariantCache

    return _apply(loaded, plan, LayerVariantCache(directory=_variant_dir(cache_dir)))


def compress(model: str, plan: CompressionPlan, out: str | Path, trust_remote_code: bool = False,
             provenance: dict[str, Any] | None = None, format: str | None = None, dtype: str = "float16",
             cache_dir: str | Path | None = None, target: str | None = None) -> Path:
    """Apply ``plan`` to ``model`` and save the compressed model in ``out`` with ``plan.json`` and
    ``autocomp.json`` (what was written, the accounted size, the provenance).

    ``format``: a registered export format (:mod:`autocomp.exporters`): ``packed`` (default; packed
    low-bit codes, bytes on disk match the accounted size) or ``float`` (a ``from_pretrained`` folder
    of dequantized weights). ``dtype``: the storage dtype of the 16-bit tensors. ``cache_dir``: the
    layer-variant folder (default: the searches' own, so an export after a search reads the variants it
    cached). The folder is written beside ``out`` and renamed into place when complete: a failed export
    leaves nothing at ``out``. Raises PlanError for a plan this model or format cannot take.
    """
    from autocomp.evaluators.size import model_size
    from autocomp.exporters import ExportOptions, get_format
    from autocomp.inputs.models import load_model
    from autocomp.inputs.targets import find_targets

    format = format or DEFAULT_FORMAT
    fmt = get_format(format)
    if dtype not in fmt.dtypes:
        raise PlanError(f"storage dtype {dtype!r} is not one of {', '.join(fmt.dtypes)} for --format {format}")
    if target is not None and target not in fmt.targets:
        raise PlanError(f"--target {target} is not checked by --format {format}; "
                        + (f"it checks {', '.join(fmt.targets)}" if fmt.targets else "it has no targets"))
    options = ExportOptions(dtype=dtype, target=target)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PlanError(f"--out {out} is a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise PlanError(f"output folder {out} is not empty; choose a new folder")
    directory = _variant_dir(cache_dir)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    dense_bytes = model_size(loaded.model, find_targets(loaded.model), {}).total_bytes
    applied = apply_plan(loaded, plan, cache_dir=directory if directory is not None else "none")
    fmt.check(applied, options)
    size = model_size(applied.model, applied.targets, applied.per_layer)
    size = replace(size, dense_bytes=dense_bytes)  # the ratio is to the original model (not a dense student)
    info: dict[str, Any] = {"model": model, "format": format}

    def write(folder: Path) -> None:
        info.update(fmt.write(folder, applied, loaded, options))
        loaded.tokenizer.save_pretrained(folder)
        plan.save(folder / "plan.json")
        info.update({"accounted_size_bytes": size.total_bytes, "accounted_size_mb": size.size_mb,
                     "dense_size_bytes": size.dense_bytes, "compression_ratio": size.compression_ratio,
                     "calibration_pipeline": applied.pipeline,
                     "params": sum(p.numel() for p in {id(p): p for p in applied.model.parameters()}.values())})
        info.update(provenance or {})
        (folder / "autocomp.json").write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")

    return _write_folder(out, write)


def _write_folder(out: Path, write) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside ``out`` and rename it to ``out`` when it returns;
    on any error the partial folder is removed (``out`` is left as it was) and an OSError becomes an
    ExportError naming the folder."""
    import shutil
    import tempfile

    from autocomp.errors import ExportError, disk_write_failure

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            out.rmdir()  # empty (checked before loading)
        tmp.rename(out)
    except Exception as exc:
        reason = disk_write_failure(exc) or (exc.strerror if isinstance(exc, OSError) else None)
        if reason is None:
            raise
        raise ExportError(f"write failed ({reason}): the export to {out} was not written; free disk space or "
                          "choose another --out") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def export(storage: str, study_name: str, trial: int, out: str | Path, format: str | None = None,
           dtype: str = "float16", cache_dir: str | Path | None = None, trust_remote_code: bool = False,
           target: str | None = None) -> Path:
    """Rebuild trial ``trial`` of the study from its stored plan and save it like :func:`compress`.
    ``format`` / ``target`` default to the study's ``deploy_target`` (vllm: compressed-tensors checked
    for vLLM; llamacpp: gguf; torch: packed), else compressed-tensors. ``trust_remote_code`` must be
    given for a study whose model runs its own code: the stored spec alone never makes this process run it."""
    from autocomp.study.prepare import check_remote_code

    records = load_records(storage, study_name)
    check_remote_code(records.spec, trust_remote_code, "autocomp export", study_name)
    record = find_trial(records, trial)
    plan = CompressionPlan.from_dict(record.plan, where=f"trial {trial} plan")
    deploy = records.spec.space.deploy
    if format is None and deploy is not None:
        format = deploy.format
        target = target if target is not None else deploy.export_target
    return compress(records.spec.model, plan, out, trust_remote_code=records.spec.trust_remote_code and trust_remote_code,
                    provenance={"study_name": study_name, "trial": trial, "metrics": record.metrics},
                    format=format, dtype=dtype, cache_dir=cache_dir, target=target)
