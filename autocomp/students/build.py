"""Building a student from a loaded teacher: prune, distill, and keep the result on disk.

``build_student(loaded, spec)`` returns the same student for the same teacher and spec, every time:
pruning and distillation are deterministic, and the finished student is saved under
``$AUTOCOMP_CACHE/students/<digest>/`` (a ``save_pretrained`` folder plus ``student.json``), so a
search, its validation and ``autocomp export`` build each student once. The digest covers the
teacher's fingerprint, the resolved student spec and the distillation windows. A distillation that
is interrupted leaves a checkpoint in ``<digest>.partial/`` and resumes from it.

The teacher's top-k targets (``teacher: topk``) are cached under ``$AUTOCOMP_CACHE/teacher-topk/``:
every student distilled on the same windows reuses one teacher pass.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autocomp.students.spec import StudentSpec

IMPORTANCE_WINDOWS = 8     # calibration windows (the first distillation windows) for importance


@dataclass
class BuiltStudent:
    """A student ready to evaluate: the model, where its blocks came from, and what building it cost."""

    model: Any
    spec: StudentSpec                  # resolved: absolute sizes
    kept_layers: tuple[int, ...]
    seconds_prune: float = 0.0
    seconds_distill: float = 0.0
    distill: dict = field(default_factory=dict)
    from_cache: bool = False

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def info(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "kept_layers": list(self.kept_layers), "params": self.n_params,
                "seconds_prune": self.seconds_prune, "seconds_distill": self.seconds_distill, "distill": self.distill}


def student_windows(tokenizer, spec: StudentSpec):
    """The distillation (and importance) windows of ``spec``: random windows of its data and split,
    each starting with BOS (fixed, so that a plan alone determines its student)."""
    from autocomp.inputs.data import WindowSpec, text_windows

    d = spec.distill
    return text_windows(tokenizer, d.data, d.split, WindowSpec(d.windows, d.seq_len, d.seed), random=True, bos="every")


def student_digest(fingerprint: str, spec: StudentSpec, windows_sha: str) -> str:
    payload = json.dumps({"teacher": fingerprint, "student": spec.to_dict(), "windows": windows_sha}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _students_root(cache_dir: Path | None) -> Path:
    from autocomp.inputs.models import cache_root

    return Path(cache_dir) if cache_dir is not None else cache_root() / "students"


def teacher_topk(teacher, fingerprint: str, windows, k: int) -> "TeacherTopK":  # noqa: F821
    """The teacher's top-k targets on ``windows`` (computed once, then read from disk; a cached file
    that fails its integrity check is recomputed, see :mod:`autocomp.cachefile`)."""
    from autocomp.cachefile import cached_tensors
    from autocomp.inputs.models import cache_root
    from autocomp.students.distill import TeacherTopK

    digest = hashlib.sha256(f"{fingerprint}:{windows.sha256}:{k}".encode()).hexdigest()[:20]
    path = cache_root() / "teacher-topk" / f"{digest}.safetensors"

    def compute() -> dict[str, torch.Tensor]:
        top = TeacherTopK.compute(teacher, windows.input_ids, k)
        return {"logits": top.logits, "indices": top.indices}

    data = cached_tensors(path, compute, "teacher top-k targets")
    return TeacherTopK(data["logits"], data["indices"])


def build_student(loaded, spec: StudentSpec, cache_dir: str | Path | None = None, progress: bool = True,
                  use_cache: bool = True) -> BuiltStudent:
    """Prune ``loaded.model`` (the teacher, left unchanged) into ``spec`` and distill it, or load it
    from the student cache. ``cache_dir``: default ``$AUTOCOMP_CACHE/students``."""
    from autocomp.students.prune import prune_student, resolve_student

    resolved = resolve_student(loaded.model.config, spec)
    windows = student_windows(loaded.tokenizer, resolved)
    digest = student_digest(loaded.fingerprint, resolved, windows.sha256)
    root = _students_root(Path(cache_dir) if cache_dir is not None else None)
    folder = root / digest
    if use_cache and (folder / "student.json").exists():
        cached = _load_cached(folder)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    calib = windows.input_ids[:IMPORTANCE_WINDOWS]
    pruned = prune_student(loaded.model, resolved.shape, calib)
    t1 = time.perf_counter()
    result = None
    if resolved.distill.steps > 0:
        from autocomp.students.distill import distill

        top = None
        if resolved.distill.teacher == "topk":
            top = teacher_topk(loaded.model, loaded.fingerprint, windows, resolved.distill.topk)
        partial = root / f"{digest}.partial"
        result = distill(pruned.model, loaded.model, windows.input_ids, resolved.distill, layer_map=pruned.kept_layers,
                         teacher_topk=top, checkpoint_dir=partial if use_cache else None,
                         checkpoint_every=max(10, resolved.distill.steps // 5), progress=progress)
        shutil.rmtree(partial, ignore_errors=True)
    built = BuiltStudent(pruned.model, resolved, tuple(pruned.kept_layers), t1 - t0,
                         result.seconds if result else 0.0, result.to_dict() if result else {})
    built.distill["layer_scores"] = list(pruned.layer_scores)
    if use_cache:
        _save(folder, built, loaded.tokenizer)
    return built


def _save(folder: Path, built: BuiltStudent, tokenizer) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        built.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {**built.info(), "weights_sha256": _weights_digests(tmp)}
        (tmp / "student.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process saved the same student first
            if not (folder / "student.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _weights_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every weights file of a saved student, by file name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def _load_cached(folder: Path) -> BuiltStudent | None:
    """The cached student, or None (the folder removed, to be rebuilt) when its weights do not match
    the digests saved with them or it cannot be read: a corrupted cache must not change a trial."""
    import logging

    from transformers import AutoModelForCausalLM

    try:
        info = json.loads((folder / "student.json").read_text())
        if not info.get("weights_sha256") or _weights_digests(folder) != info["weights_sha256"]:
            raise ValueError("weights do not match their digests")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        logging.getLogger("autocomp.cache").warning(
            "autocomp: warning: cached student %s is unusable (%s); rebuilt", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BuiltStudent(model, StudentSpec.from_dict(info["spec"]), tuple(info["kept_layers"]),
                        info["seconds_prune"], info["seconds_distill"], info["distill"], from_cache=True)
