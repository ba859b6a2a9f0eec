"""A GGUF file loaded in llama.cpp: its logits, its scores against a reference, its speed.

Scores use llama.cpp's own logits (``logits_all``), one window at a time from an empty KV cache,
through the same :func:`~autocomp.evaluators.quality.score_logits` as the torch path: perplexity,
and KL to the reference's top-k log-probabilities. llama.cpp quantizes activations to 8 bits in
its matmuls, so even the unquantized file is a little off the torch model (KL about 0.005 on
gemma3-270m): compare GGUF files with a reference scored by llama.cpp too (:func:`reference`).

Timing: prefill is one ``eval`` of a ``prompt``-token prompt; decode is ``decode`` single-token
``eval`` calls after it; each is the best of ``repeats`` runs, from an empty cache each time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autocomp.errors import ModelLoadError
from autocomp.evaluators.quality import DenseReference, WindowScores, score_logits
from autocomp.llamacpp.binding import clear_log, lib, recent_log


@dataclass(frozen=True)
class Timing:
    prefill_ms: float           # the whole prompt
    decode_ms_per_token: float
    threads: int
    prompt: int
    decode: int


class LlamaCppModel:
    """One GGUF file in llama.cpp (CPU), a context of ``n_ctx`` tokens, ``threads`` threads."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int, logits_all: bool = True) -> None:
        llama_cpp = lib()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file {self.path} does not exist")
        clear_log()
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                                       verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {self.path}: {recent_log()}") from exc
        self.n_ctx, self.threads = n_ctx, threads
        self.vocab = self.llm.n_vocab()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits (``[len(ids), vocab]``, float32) of one window, from an empty cache: a view of
        llama.cpp's buffer (no 0.5 GB copy per gemma window), valid until the next call."""
        if ids.numel() > self.n_ctx:
            raise ValueError(f"a window of {ids.numel()} tokens does not fit a context of {self.n_ctx}")
        if int(ids.max()) >= self.vocab:
            raise ModelLoadError(f"{self.path} has {self.vocab} tokens; the windows use token {int(ids.max())} "
                                 "(a GGUF file of another model?)")
        self.llm.reset()
        self.llm.eval(ids.tolist())
        return torch.from_numpy(np.asarray(self.llm.scores[:ids.numel()], dtype=np.float32))

    def score(self, input_ids: torch.Tensor, reference: DenseReference | None = None,
              topk: int = 0) -> tuple[WindowScores, DenseReference | None]:
        return score_logits(self.logits, input_ids, reference, topk)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def timed_runs(model: LlamaCppModel, tokens: list[int], prompt: int, runs: int) -> tuple[list[float], list[float]]:
    """``runs`` runs of ``tokens`` from an empty cache each: the first ``prompt`` as one prompt, then
    one token at a time. Returns (prefill ms per run, decode ms per token per run)."""
    decode = max(len(tokens) - prompt, 1)
    prefill_ms, decode_ms = [], []
    for _ in range(runs):
        model.llm.reset()
        start = time.perf_counter()
        model.llm.eval(tokens[:prompt])
        mid = time.perf_counter()
        for token in tokens[prompt:]:
            model.llm.eval([token])
        end = time.perf_counter()
        prefill_ms.append((mid - start) * 1e3)
        decode_ms.append((end - mid) * 1e3 / decode)
    return prefill_ms, decode_ms


def random_tokens(vocab: int, n: int, seed: int) -> list[int]:
    """``n`` reproducible random token ids below ``vocab`` (what is timed does not depend on the text)."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(path: str | Path, threads: int, prompt: int, decode: int, repeats: int = 3, seed: int = 0) -> Timing:
    """Prefill and decode times (best of ``repeats``) of the GGUF file at ``path`` on random tokens,
    with logits for the last position only (as a server computes them)."""
    with LlamaCppModel(path, prompt + decode, threads, logits_all=False) as model:
        prefill_ms, decode_ms = timed_runs(model, random_tokens(model.vocab, prompt + decode, seed), prompt, repeats)
    return Timing(min(prefill_ms), min(decode_ms), threads, prompt, decode)


def reference(path: str | Path, input_ids: torch.Tensor, topk: int, threads: int) -> DenseReference:
    """The top-k log-probabilities of the GGUF file at ``path`` (the unquantized model) on ``input_ids``."""
    with LlamaCppModel(path, input_ids.shape[1], threads) as model:
        return model.score(input_ids, topk=topk)[1]
