"""Objectives and budgets: from a trial's metrics to Optuna values and constraints.

Objectives are metric names, all minimised: ``perplexity``, ``kl`` (KL to the dense model),
``size_mb``, and, when the study measures latency (:mod:`autocomp.latency.timing`),
``latency_ms`` and ``memory_mb``. Budgets become Optuna constraints ``c <= 0`` (feasible):

* ``max_ppl_increase_pct``: ``100 * (ppl / dense_ppl - 1) - budget``;
* ``max_size_mb``: ``size_mb - budget``;
* ``max_kl``: ``kl - budget``;
* ``max_latency_ms``: ``latency_ms - budget`` (decode ms per token, or prefill ms: the study's
  latency metric);
* ``max_memory_mb``: ``memory_mb - budget`` (peak memory of the deployed model while it runs).

The same functions serve the search (constraints stored with every trial) and ``recommend``
(re-evaluated under new budgets from the stored metrics, without running anything).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from autocomp.errors import BudgetError

OBJECTIVES = {"perplexity": "perplexity", "kl": "KL to dense (nats/token)", "size_mb": "size (MB)",
              "latency_ms": "latency (ms)", "memory_mb": "peak memory (MB)"}
LATENCY_OBJECTIVES = ("latency_ms", "memory_mb")
DEFAULT_OBJECTIVES = ("perplexity", "size_mb")


def validate_objectives(objectives: tuple[str, ...]) -> tuple[str, ...]:
    if not objectives:
        raise BudgetError("at least one objective is needed; choose from " + ", ".join(OBJECTIVES))
    for name in objectives:
        if name not in OBJECTIVES:
            raise BudgetError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives):
        raise BudgetError(f"objectives repeat a name: {list(objectives)}")
    return tuple(objectives)


@dataclass(frozen=True)
class Budgets:
    max_ppl_increase_pct: float | None = None
    max_size_mb: float | None = None
    max_kl: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise BudgetError(f"budget {name} must be a finite number, got {value!r}")
        if self.max_ppl_increase_pct is not None and self.max_ppl_increase_pct < 0:
            raise BudgetError(f"--max-ppl-increase must be >= 0 (a percentage over the dense perplexity), got {self.max_ppl_increase_pct}")
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise BudgetError(f"--max-size-mb must be > 0, got {self.max_size_mb}")
        if self.max_kl is not None and self.max_kl < 0:
            raise BudgetError(f"--max-kl must be >= 0, got {self.max_kl}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise BudgetError(f"--max-latency-ms must be > 0, got {self.max_latency_ms}")
        if self.max_memory_mb is not None and self.max_memory_mb <= 0:
            raise BudgetError(f"--max-memory-mb must be > 0, got {self.max_memory_mb}")

    @property
    def needs_latency(self) -> bool:
        """True when a budget can only be checked by measuring the deployed model."""
        return self.max_latency_ms is not None or self.max_memory_mb is not None

    def to_dict(self) -> dict[str, float | None]:
        """Unset latency budgets are left out, so studies stored before they existed keep their hash."""
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("max_latency_ms", "max_memory_mb")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Budgets":
        return cls(**{k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__})

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def constraints(self, metrics: Mapping[str, float], dense_ppl: float) -> dict[str, float]:
        """Constraint values by name (``<= 0`` is feasible), only for the budgets that are set."""
        out: dict[str, float] = {}
        if self.max_ppl_increase_pct is not None:
            out["ppl_increase_pct"] = ppl_increase_pct(metrics["perplexity"], dense_ppl) - self.max_ppl_increase_pct
        if self.max_size_mb is not None:
            out["size_mb"] = metrics["size_mb"] - self.max_size_mb
        if self.max_kl is not None:
            kl = metrics.get("kl")
            out["kl"] = (kl if kl is not None else math.inf) - self.max_kl
        if self.max_latency_ms is not None:
            out["latency_ms"] = metrics.get("latency_ms", math.inf) - self.max_latency_ms
        if self.max_memory_mb is not None:
            out["memory_mb"] = metrics.get("memory_mb", math.inf) - self.max_memory_mb
        return {k: (c if math.isfinite(c) else 1e30) for k, c in out.items()}

    def feasible(self, metrics: Mapping[str, float], dense_ppl: float) -> bool:
        return all(c <= 0 for c in self.constraints(metrics, dense_ppl).values())

    def describe(self) -> str:
        parts = []
        if self.max_ppl_increase_pct is not None:
            parts.append(f"perplexity +{self.max_ppl_increase_pct:g}% at most")
        if self.max_size_mb is not None:
            parts.append(f"size <= {self.max_size_mb:g} MB")
        if self.max_kl is not None:
            parts.append(f"KL <= {self.max_kl:g}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_memory_mb is not None:
            parts.append(f"memory <= {self.max_memory_mb:g} MB")
        return ", ".join(parts) or "no budgets"


def ppl_increase_pct(ppl: float, dense_ppl: float) -> float:
    return 100.0 * (ppl / dense_ppl - 1.0) if math.isfinite(ppl) else math.inf


def objective_values(metrics: Mapping[str, float], objectives: tuple[str, ...]) -> list[float]:
    values = []
    for name in objectives:
        v = float(metrics[name])
        values.append(v if math.isfinite(v) else 1e30)
    return values
