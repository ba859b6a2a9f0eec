"""Language-modelling quality: perplexity, and KL divergence to the dense model.

One forward pass per evaluation window gives both figures. Logits are turned into log-probabilities
``chunk`` positions at a time, so memory stays bounded even with a 262k-token vocabulary.

KL to the dense model uses the dense model's top-``k`` log-probabilities per position, computed once
per study (:func:`dense_reference`). With ``S`` the dense top-``k`` tokens, ``p`` dense and ``q``
compressed, the figure is the exact KL between the two distributions coarsened to ``k + 1`` outcomes
(the ``k`` tokens and "everything else")::

    KL_k = sum_{i in S} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

It is a lower bound of the full KL (data processing inequality) and tends to it as ``k`` grows; it
needs ``k`` floats per token instead of the vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class DenseReference:
    """Dense top-k log-probs per evaluation position (``[n, seq-1, k]``), and the dense NLL per window."""

    topk_logprobs: torch.Tensor
    topk_indices: torch.Tensor
    nll: torch.Tensor        # [n] summed NLL per window
    tokens: torch.Tensor     # [n] predicted tokens per window

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.sum() / self.tokens.sum()))

    def subset(self, rows: slice) -> "DenseReference":
        return DenseReference(self.topk_logprobs[rows], self.topk_indices[rows], self.nll[rows], self.tokens[rows])


@dataclass
class WindowScores:
    nll: torch.Tensor          # [n] summed negative log-likelihood per window
    tokens: torch.Tensor       # [n] predicted tokens per window
    kl: torch.Tensor | None    # [n] summed KL to the dense model per window

    @property
    def perplexity(self) -> float:
        value = float(self.nll.sum() / self.tokens.sum())
        return math.exp(value) if value < 700 else float("inf")

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else float(self.kl.sum() / self.tokens.sum())

    @staticmethod
    def concat(parts: "list[WindowScores]") -> "WindowScores":
        kls = [p.kl for p in parts]
        return WindowScores(torch.cat([p.nll for p in parts]), torch.cat([p.tokens for p in parts]),
                            None if any(k is None for k in kls) else torch.cat(kls))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, numerically stable."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl(ref_lp: torch.Tensor, ref_idx: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """Per-position KL_k (see module docstring). ``q_top`` holds the compressed model's
    log-probabilities at the dense top-k tokens (``[T, k]``), like ``ref_lp``."""
    p_top = ref_lp.exp()
    kl = (p_top * (ref_lp - q_top)).sum(dim=1)
    log_p_rest = _log1mexp(torch.logsumexp(ref_lp, dim=1))
    log_q_rest = _log1mexp(torch.logsumexp(q_top, dim=1))
    kl = kl + log_p_rest.exp() * (log_p_rest - log_q_rest)
    return kl.clamp(min=0.0)


@torch.no_grad()
def score_windows(model: nn.Module, input_ids: torch.Tensor, reference: DenseReference | None = None,
                  topk: int = 0, chunk: int = 128) -> tuple[WindowScores, DenseReference | None]:
    """Score every window of ``input_ids`` (``[n, seq]``) with a torch causal LM (see :func:`score_logits`)."""
    return score_logits(lambda ids: model(ids.unsqueeze(0), use_cache=False).logits[0], input_ids, reference, topk, chunk)


@torch.no_grad()
def score_logits(forward: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                 reference: DenseReference | None = None, topk: int = 0,
                 chunk: int = 128) -> tuple[WindowScores, DenseReference | None]:
    """Score every window of ``input_ids`` (``[n, seq]``); ``forward(ids)`` gives one window's logits
    (``[seq, vocab]``) in any engine.

    Log-probabilities are never materialised over the vocabulary: per position only the
    log-normaliser ``logsumexp(logits)`` is computed, and the few log-probabilities needed (the
    target token, the dense top-k) are ``logit - lse``. Returns the scores and, when ``topk > 0``, a
    new :class:`DenseReference` built from this model's own outputs (call it on the dense model once
    per study); a ``topk`` above the vocabulary keeps the whole vocabulary.
    """
    n, seq = input_ids.shape
    nll = torch.zeros(n, dtype=torch.float64)
    kl = torch.zeros(n, dtype=torch.float64) if reference is not None else None
    ref_lp = ref_idx = None
    for w in range(n):
        logits = forward(input_ids[w])
        if topk and ref_lp is None:
            topk = min(topk, logits.shape[-1])
            ref_lp = torch.empty(n, seq - 1, topk)
            ref_idx = torch.empty(n, seq - 1, topk, dtype=torch.long)
        for start in range(0, seq - 1, chunk):
            stop = min(start + chunk, seq - 1)
            z = logits[start:stop].float()
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            target = input_ids[w, start + 1:stop + 1]
            nll[w] += (lse.squeeze(1) - z.gather(1, target.unsqueeze(1)).squeeze(1)).sum().double()
            if reference is not None:
                idx = reference.topk_indices[w, start:stop]
                kl[w] += topk_kl(reference.topk_logprobs[w, start:stop], idx, z.gather(1, idx) - lse).sum().double()
            if topk:
                values, indices = z.topk(topk, dim=1)
                ref_lp[w, start:stop] = values - lse
                ref_idx[w, start:stop] = indices
        del logits
    tokens = torch.full((n,), seq - 1, dtype=torch.long)
    scores = WindowScores(nll, tokens, kl)
    new_ref = DenseReference(ref_lp, ref_idx, nll.clone(), tokens.clone()) if topk else None
    return scores, new_ref
