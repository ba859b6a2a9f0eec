"""Bootstrap confidence intervals over evaluation windows.

A perplexity measured on ``n`` windows is one draw: other text of the same kind gives another
figure. Windows are the unit of resampling (tokens inside a window are not independent). For a
compressed model scored on the same windows as the dense model, the interval of the *ratio* is
paired: each bootstrap replicate draws one multiset of windows and computes both perplexities on it,
so the text-difficulty variation that both models share cancels out and the interval reflects only
how much the damage varies from window to window.

Percentile intervals, ``B`` replicates (default 1000), a seeded generator: the same inputs give the
same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Interval:
    value: float        # the figure on all windows (not the bootstrap mean)
    low: float
    high: float
    level: float

    @property
    def width(self) -> float:
        return self.high - self.low

    def as_list(self) -> list[float]:
        return [self.low, self.high]

    def describe(self, fmt: str = "{:+.2f}", unit: str = "") -> str:
        pct = round(100 * self.level)
        return f"{fmt.format(self.value)}{unit} [{pct}% CI {fmt.format(self.low)}, {fmt.format(self.high)}]"


def _resample_index(n: int, replicates: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (replicates, n), generator=gen)


def _percentiles(samples: torch.Tensor, level: float) -> tuple[float, float]:
    finite = samples[torch.isfinite(samples)]
    if finite.numel() < samples.numel():  # an overflowed replicate: the interval is unbounded above
        return (float(torch.quantile(finite, (1 - level) / 2)) if finite.numel() else math.inf, math.inf)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    low, high = torch.quantile(samples, q).tolist()
    return low, high


def _check(level: float, replicates: int, *tensors: torch.Tensor) -> int:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if replicates < 10:
        raise ValueError(f"need at least 10 bootstrap replicates, got {replicates}")
    n = tensors[0].numel()
    if n == 0 or any(t.numel() != n for t in tensors):
        raise ValueError("per-window tensors must be non-empty and of equal length")
    return n


def perplexity_interval(nll: Sequence[float] | torch.Tensor, tokens: Sequence[int] | torch.Tensor,
                        level: float = 0.95, replicates: int = 1000, seed: int = 0) -> Interval:
    """Interval of ``exp(sum nll / sum tokens)`` over windows (``nll``: summed NLL per window)."""
    nll, tokens = torch.as_tensor(nll, dtype=torch.float64), torch.as_tensor(tokens, dtype=torch.float64)
    n = _check(level, replicates, nll, tokens)
    idx = _resample_index(n, replicates, seed)
    samples = (nll[idx].sum(1) / tokens[idx].sum(1)).exp()
    low, high = _percentiles(samples, level)
    return Interval(math.exp(float(nll.sum() / tokens.sum())), low, high, level)


def paired_increase_interval(nll: Sequence[float] | torch.Tensor, dense_nll: Sequence[float] | torch.Tensor,
                             tokens: Sequence[int] | torch.Tensor, level: float = 0.95, replicates: int = 1000,
                             seed: int = 0) -> Interval:
    """Interval of the perplexity increase in percent, ``100 (ppl / dense_ppl - 1)``, both models
    scored on the same windows (paired resampling)."""
    nll = torch.as_tensor(nll, dtype=torch.float64)
    dense_nll = torch.as_tensor(dense_nll, dtype=torch.float64)
    tokens = torch.as_tensor(tokens, dtype=torch.float64)
    n = _check(level, replicates, nll, dense_nll, tokens)
    idx = _resample_index(n, replicates, seed)
    diff = nll - dense_nll  # log ppl ratio = sum(diff) / sum(tokens)
    samples = 100.0 * torch.expm1(diff[idx].sum(1) / tokens[idx].sum(1))
    low, high = _percentiles(samples, level)
    return Interval(100.0 * math.expm1(float(diff.sum() / tokens.sum())), low, high, level)


def mean_interval(values: Sequence[float] | torch.Tensor, tokens: Sequence[int] | torch.Tensor,
                  level: float = 0.95, replicates: int = 1000, seed: int = 0) -> Interval:
    """Interval of a per-token mean (e.g. KL to the dense model) from per-window sums."""
    values = torch.as_tensor(values, dtype=torch.float64)
    tokens = torch.as_tensor(tokens, dtype=torch.float64)
    n = _check(level, replicates, values, tokens)
    idx = _resample_index(n, replicates, seed)
    samples = values[idx].sum(1) / tokens[idx].sum(1)
    low, high = _percentiles(samples, level)
    return Interval(float(values.sum() / tokens.sum()), low, high, level)


def paired_drop_interval(dense: Sequence[float] | torch.Tensor, compressed: Sequence[float] | torch.Tensor,
                         level: float = 0.95, replicates: int = 1000, seed: int = 0) -> Interval:
    """Interval of the accuracy drop in points, ``100 (mean(dense) - mean(compressed))``, both scored
    on the same documents (paired resampling of documents)."""
    dense = torch.as_tensor(dense, dtype=torch.float64)
    compressed = torch.as_tensor(compressed, dtype=torch.float64)
    n = _check(level, replicates, dense, compressed)
    idx = _resample_index(n, replicates, seed)
    diff = 100.0 * (dense - compressed)
    low, high = _percentiles(diff[idx].mean(1), level)
    return Interval(float(diff.mean()), low, high, level)
