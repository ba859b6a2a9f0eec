"""StudySpec: everything that determines a study's trials, frozen and hashed.

The hash covers the model, data, windows, search space (its content, not its path), objectives,
budgets, sampler and seed. It does not cover the number of trials (asking for more resumes the same
study), the storage URL, the study name or display options. Re-running a study name with a spec of a
different hash is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autocomp.inputs.data import BOS_MODES, WindowSpec
from autocomp.errors import StudyError
from autocomp.latency.spec import LatencySpec
from autocomp.config.objectives import DEFAULT_OBJECTIVES, LATENCY_OBJECTIVES, Budgets, validate_objectives
from autocomp.config.space import SearchSpace

if TYPE_CHECKING:
    from autocomp.config.plan import CalibrationSpec

SAMPLERS = ("nsga2", "tpe", "evo")


@dataclass(frozen=True)
class StudySpec:
    model: str
    space: SearchSpace
    data: str = "wikitext2"
    calib_data: str | None = None
    eval_windows: WindowSpec = field(default_factory=lambda: WindowSpec(16, 512))
    calib_windows: WindowSpec = field(default_factory=lambda: WindowSpec(16, 512, seed=0))
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    budgets: Budgets = field(default_factory=Budgets)
    sampler: str = "nsga2"
    seed: int = 0
    kl_topk: int = 128
    bos: str = "every"
    staged_windows: int = 0       # stage-1 windows of staged evaluation; 0 = off
    calibration_mode: str = "dense"  # dense (stitched variants) | sequential (exact, per plan)
    sensitivity: bool | str = False  # sensitivity pass: True/"output" layer-output error, "fisher" predicted KL, "kl" measured KL
    pin_sensitive: int = 0           # pin this many most sensitive groups to their most accurate choice
    trust_remote_code: bool = False
    latency: LatencySpec | None = None  # measure the deployed model's latency and memory in every trial

    def __post_init__(self) -> None:
        validate_objectives(self.objectives)
        wants = [o for o in self.objectives if o in LATENCY_OBJECTIVES] + (["a latency or memory budget"]
                                                                           if self.budgets.needs_latency else [])
        if wants and self.latency is None:
            raise StudyError(f"{', '.join(wants)} needs latency measurement settings (a LatencySpec; the CLI "
                             "makes one from --latency-device, --latency-threads, ...)")
        if self.latency is not None and self.latency.engine == "llamacpp" and self.space.deploy_target != "llamacpp":
            raise StudyError(f"the llamacpp latency engine times the GGUF file each candidate exports to, but space "
                             f"{self.space.name!r} has no 'deploy_target: llamacpp' (its candidates need not fit GGUF's "
                             "blocks); search such a space (e.g. --space llamacpp) or use --latency-engine torch")
        if self.latency is not None and self.latency.engine == "torch":
            from autocomp.compressors.ggml import GGML_METHODS

            if set(self.space.quant_methods) & set(GGML_METHODS):
                raise StudyError(f"space {self.space.name!r} searches llama.cpp's own types, which run in llama.cpp "
                                 "only: time them with --latency-engine llamacpp")
        if self.sampler not in SAMPLERS:
            raise StudyError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.bos not in BOS_MODES:
            raise StudyError(f"unknown bos mode {self.bos!r}; choose from {', '.join(BOS_MODES)}")
        from autocomp.config.plan import CALIBRATION_MODES

        if self.calibration_mode not in CALIBRATION_MODES:
            raise StudyError(f"unknown calibration mode {self.calibration_mode!r}; choose from {', '.join(CALIBRATION_MODES)}")
        if self.sensitivity not in (False, True, "output", "fisher", "kl"):
            raise StudyError(f"sensitivity must be off, 'output', 'fisher' or 'kl', got {self.sensitivity!r}")
        if self.pin_sensitive < 0 or (self.pin_sensitive and not self.sensitivity):
            raise StudyError("pinning sensitive groups needs the sensitivity pass (--sensitivity) and a count >= 0")
        if self.staged_windows and not 2 <= self.staged_windows < self.eval_windows.count:
            raise StudyError(f"staged evaluation needs 2 <= stage-1 windows < evaluation windows ({self.eval_windows.count}), "
                             f"got {self.staged_windows}")
        if self.space.student is not None:
            unsupported = [name for name, on in (("--sensitivity", self.sensitivity), ("--sampler evo", self.sampler == "evo"),
                                                 ("--calibration sequential", self.calibration_mode == "sequential")) if on]
            if unsupported:
                raise StudyError(f"space {self.space.name!r} searches students; {', '.join(unsupported)} work on the "
                                 "teacher's layers only and cannot be combined with it yet: drop them or the student section")
        if self.kl_topk < 1:
            raise StudyError(f"kl_topk must be >= 1, got {self.kl_topk}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise StudyError(f"--seed must be a whole number from 0 to {2 ** 32 - 1}, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "calib_data": self.calib_data,
            "eval_windows": {"count": self.eval_windows.count, "seq_len": self.eval_windows.seq_len},
            "calib_windows": {"count": self.calib_windows.count, "seq_len": self.calib_windows.seq_len,
                              "seed": self.calib_windows.seed},
            "space": self.space.to_dict(),
            "objectives": list(self.objectives),
            "budgets": self.budgets.to_dict(),
            "sampler": self.sampler,
            "seed": self.seed,
            "kl_topk": self.kl_topk,
            "bos": self.bos,
            "staged_windows": self.staged_windows,
            "calibration_mode": self.calibration_mode,
            "sensitivity": self.sensitivity,
            "pin_sensitive": self.pin_sensitive,
            "trust_remote_code": self.trust_remote_code,
            "latency": self.latency.to_dict() if self.latency is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudySpec":
        ew, cw = data["eval_windows"], data["calib_windows"]
        return cls(
            model=data["model"], data=data["data"], calib_data=data.get("calib_data"),
            eval_windows=WindowSpec(ew["count"], ew["seq_len"]),
            calib_windows=WindowSpec(cw["count"], cw["seq_len"], cw.get("seed", 0)),
            space=SearchSpace.from_dict(data["space"], "stored study spec"),
            objectives=tuple(data["objectives"]), budgets=Budgets.from_dict(data["budgets"]),
            sampler=data["sampler"], seed=data["seed"], kl_topk=data.get("kl_topk", 128), bos=data.get("bos", "every"),
            staged_windows=data.get("staged_windows", 0), calibration_mode=data.get("calibration_mode", "dense"),
            sensitivity=data.get("sensitivity", False), pin_sensitive=data.get("pin_sensitive", 0),
            trust_remote_code=data.get("trust_remote_code", False),
            latency=LatencySpec.from_dict(data["latency"]) if data.get("latency") else None,
        )

    def sequence_lengths(self) -> dict[str, int]:
        """Every sequence length the study runs the model on, by the flag that sets it (checked
        against the model's positions before any data is read)."""
        out = {"--eval-seq-len": self.eval_windows.seq_len, "--calib-seq-len": self.calib_windows.seq_len}
        if self.latency is not None:
            out["--latency-prompt-len + --latency-new-tokens"] = self.latency.prompt_len + self.latency.new_tokens
        return out

    def calibration(self) -> "CalibrationSpec":
        from autocomp.inputs.data import calibration_source
        from autocomp.config.plan import CalibrationSpec

        source, split = calibration_source(self.data, self.calib_data)
        return CalibrationSpec(source, split, self.calib_windows.count, self.calib_windows.seq_len,
                               self.calib_windows.seed, self.bos, self.calibration_mode)

    def digest(self) -> str:
        """Hash of the spec. Top-level options at their default value are left out, so that adding
        an option (with a default that keeps the old behaviour) does not change existing studies' hashes."""
        defaults = {"calib_data": None, "kl_topk": 128, "bos": "every", "staged_windows": 0,
                    "calibration_mode": "dense", "sensitivity": False, "pin_sensitive": 0, "trust_remote_code": False,
                    "latency": None}
        data = {k: v for k, v in self.to_dict().items() if not (k in defaults and v == defaults[k])}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def spec_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two spec dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(spec_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return diffs
