"""The quality evaluator: perplexity and the top-k KL to the dense model, on a tiny model."""

import math

import pytest
import torch

from autocomp.evaluators.quality import score_windows
from autocomp.config.plan import LayerPlan
from autocomp.pipeline.stitch import ModelStitcher
from autocomp.inputs.targets import find_targets


def _windows(vocab: int, n: int = 3, seq: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n, seq), generator=gen)


def _full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)


def test_perplexity_matches_a_direct_computation(llama):
    ids = _windows(llama.model.config.vocab_size)
    scores, _ = score_windows(llama.model, ids, chunk=7)  # odd chunk: exercises the chunk boundaries
    lp = _full_logprobs(llama.model, ids)
    nll = -lp[:, :-1].gather(2, ids[:, 1:].unsqueeze(2)).sum()
    expected = math.exp(float(nll) / (ids.shape[0] * (ids.shape[1] - 1)))
    assert scores.perplexity == pytest.approx(expected, rel=1e-5)
    assert scores.tokens.tolist() == [ids.shape[1] - 1] * ids.shape[0]


def _compressed(loaded):
    targets = find_targets(loaded.model)
    stitcher = ModelStitcher(loaded.model, targets, loaded.fingerprint)
    stitcher.apply({t.name: LayerPlan("rtn", bits=2, group_size=16) for t in targets if t.in_blocks})
    return stitcher


def test_kl_with_the_whole_vocabulary_is_the_exact_kl_and_topk_is_a_lower_bound(llama):
    ids = _windows(llama.model.config.vocab_size)
    vocab = llama.model.config.vocab_size
    _, ref_full = score_windows(llama.model, ids, topk=vocab)
    _, ref_small = score_windows(llama.model, ids, topk=8)
    p = _full_logprobs(llama.model, ids)[:, :-1]
    stitcher = _compressed(llama)
    try:
        q = _full_logprobs(llama.model, ids)[:, :-1]
        exact = float((p.exp() * (p - q)).sum()) / (ids.shape[0] * (ids.shape[1] - 1))
        full, _ = score_windows(llama.model, ids, reference=ref_full)
        small, _ = score_windows(llama.model, ids, reference=ref_small)
    finally:
        stitcher.apply({})
    assert exact > 1e-4, "2-bit RTN must move the distribution"
    assert full.mean_kl == pytest.approx(exact, rel=1e-3)
    assert 0 <= small.mean_kl <= full.mean_kl + 1e-9


def test_kl_of_the_dense_model_to_itself_is_zero(llama):
    ids = _windows(llama.model.config.vocab_size)
    _, ref = score_windows(llama.model, ids, topk=16)
    scores, _ = score_windows(llama.model, ids, reference=ref)
    assert scores.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(scores.nll, ref.nll)
