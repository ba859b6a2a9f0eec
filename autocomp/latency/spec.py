"""How a study measures latency: device, threads, shapes, repeats (no torch import here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from autocomp.errors import BudgetError

ENGINES = ("torch", "llamacpp")   # who runs the timed model: autocomp's kernels in torch, or llama.cpp
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
METRICS = ("decode", "prefill")


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured; part of a study's specification when latency is searched.

    ``engine`` ``torch`` times the model with autocomp's kernels (:mod:`autocomp.latency.trial`);
    ``llamacpp`` times the GGUF file the candidate exports to, in llama.cpp on the CPU
    (:mod:`autocomp.llamacpp.latency`; ``dtype`` and ``dynamic_int8`` do not apply there)."""

    device: str = "cpu"
    threads: int = 0               # 0: the engine's default (all cores)
    dtype: str = "float32"         # activations and dense weights (torch engine)
    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    metric: str = "decode"         # latency_ms is decode ms/token, or prefill ms
    dynamic_int8: bool = False     # run 8-bit per-channel layers with int8 activations (approximate)
    margin: float = 0.25           # skip measuring when the table predicts > budget * (1 + margin)
    seed: int = 0
    engine: str = "torch"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise BudgetError(f"latency engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "llamacpp" and (self.device != "cpu" or self.batch != 1):
            raise BudgetError("the llamacpp latency engine times one sequence on the CPU: use --latency-device cpu "
                              "and --latency-batch 1")
        if self.device not in DEVICES:
            raise BudgetError(f"latency device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise BudgetError(f"latency dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.metric not in METRICS:
            raise BudgetError(f"latency metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ("batch", "prompt_len", "new_tokens", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BudgetError(f"latency {name} must be a positive integer, got {value!r}")
        if self.warmup < 0 or self.threads < 0:
            raise BudgetError("latency warmup and threads must be >= 0")
        if not 0 <= self.margin <= 10:
            raise BudgetError(f"latency margin must be in [0, 10], got {self.margin}")

    def hopeless(self, predicted_ms: float, budget_ms: float | None) -> bool:
        """True when even a prediction error of ``margin`` could not bring a candidate predicted at
        ``predicted_ms`` under the latency budget (None: no budget)."""
        return budget_ms is not None and predicted_ms > budget_ms * (1.0 + self.margin)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The stored form; the default engine is left out, so studies stored before engines existed
        keep their hash."""
        out = asdict(self)
        if out["engine"] == "torch":
            del out["engine"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "LatencySpec":
        return cls(**{k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__})

    def check_device(self) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BudgetError("latency device 'cuda' was asked for but torch sees no CUDA device here; "
                              "use --latency-device cpu or run on a machine with a GPU")
