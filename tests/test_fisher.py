"""Output-gradient Fisher factors and the ``fisher`` sensitivity proxy: the predicted KL of a layer's
weight change follows the KL measured end to end, the pass leaves the model as it found it, and a
study with ``sensitivity: fisher`` stores a table in nats per token (the embedding group measured)."""

from __future__ import annotations

import json

import pytest
import torch

from autocomp.inputs.data import WindowSpec
from autocomp.inputs.models import load_model
from autocomp.inputs.targets import block_targets, find_targets, get_module, read_weight, write_weight


def _ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


def _windows(vocab: int, n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt", "qwen2"])
def test_predicted_kl_follows_measured_kl(tiny_models, arch):
    """Quantize one layer at a time (GPTQ 3-bit): the second-order prediction ranks the layers like
    the KL measured on other windows and is of the same magnitude."""
    from autocomp.pipeline.calibration import collect_input_stats
    from autocomp.pipeline.layer import compress_weight
    from autocomp.evaluators.quality import score_windows
    from autocomp.sensitivity.fisher import gradient_factors
    from autocomp.config.plan import LayerPlan

    lm = load_model(str(tiny_models[arch]))
    model, vocab = lm.model, lm.model.config.vocab_size
    targets = block_targets(find_targets(model))
    calib, held = _windows(vocab, 16, 64, 0), _windows(vocab, 16, 64, 1)
    stats = collect_input_stats(model, targets, calib, hessian=True)
    factors = gradient_factors(model, targets, calib)
    _, reference = score_windows(model, held, topk=vocab)  # every token: the exact KL
    predicted, measured = [], []
    for t in targets:
        module = get_module(model, t.name)
        dense = read_weight(module).clone()
        compressed = compress_weight(dense, LayerPlan("gptq", bits=3, group_size=32), stats[t.name]).weight
        predicted.append(factors.predicted_kl(t.name, compressed - dense))
        write_weight(module, compressed)
        measured.append(score_windows(model, held, reference=reference)[0].mean_kl)
        write_weight(module, dense)
    assert all(p > 0 for p in predicted)
    rho = float(torch.corrcoef(torch.stack([_ranks(predicted), _ranks(measured)]))[0, 1])
    assert rho >= 0.7, (rho, predicted, measured)
    ratios = sorted(m / p for p, m in zip(predicted, measured))
    assert 1 / 3 <= ratios[len(ratios) // 2] <= 3, ratios


def test_fisher_pass_leaves_the_model_as_it_was(tiny_models):
    from autocomp.sensitivity.fisher import gradient_factors

    lm = load_model(str(tiny_models["gemma3"]))
    model = lm.model
    model.lm_head.weight.requires_grad_(True)  # whatever the caller had is restored
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = _windows(model.config.vocab_size, 2, 32, 0)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    targets = block_targets(find_targets(model))
    first = gradient_factors(model, targets, ids, seed=3, full_limit=64)
    assert set(first.output) == set(first.inputs) == {t.name for t in targets}
    for t in targets:
        g, moment = first.output[t.name], first.inputs[t.name]
        assert g.shape == (t.out_features,) and bool((g >= 0).all()) and float(g.sum()) > 0
        if t.in_features <= 64:  # a full symmetric positive semi-definite matrix
            assert moment.shape == (t.in_features, t.in_features)
            assert torch.allclose(moment, moment.t()) and float(torch.linalg.eigvalsh(moment.double()).min()) > -1e-4
        else:  # its diagonal only
            assert moment.shape == (t.in_features,) and bool((moment >= 0).all())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, before)
    # the sampled labels come from the seed: same seed, same factors
    again = gradient_factors(model, targets, ids, seed=3, full_limit=64)
    assert all(torch.equal(first.output[n], again.output[n]) and torch.equal(first.inputs[n], again.inputs[n])
               for n in first.output)


def test_fisher_sensitivity_study(tiny_models, tmp_path):
    """sensitivity='fisher': decoder groups predicted, the embedding group measured, all in nats."""
    import optuna

    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.study.local import run_local

    space = SearchSpace.from_dict({"name": "rtn-role", "granularity": "role",
                                   "targets": {"embeddings": True},
                                   "quantization": {"methods": ["rtn"], "bits": [2, 4, 16], "group_size": [32]}},
                                  "test")
    spec = StudySpec(model=str(tiny_models["llama"]), space=space, eval_windows=WindowSpec(4, 64),
                     calib_windows=WindowSpec(4, 64, 0), sensitivity="fisher")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    outcome = run_local(spec, url, "fisher", 5, progress=False, echo=lambda m: None)
    assert outcome.failed == 0
    table = optuna.load_study(study_name="fisher", storage=url).user_attrs["autocomp_sensitivity"]
    lm = load_model(str(tiny_models["llama"]))
    assert set(table) == set(space.groups(space.select_targets(find_targets(lm.model))))
    assert any("embed" in g for g in table)
    for g, rows in table.items():
        e = {json.loads(label)["bits"]: r["error"] for label, r in rows.items()}
        assert e[16] == 0.0
        assert e[2] > e[4] > 0, (g, e)
        assert e[2] < 20, (g, e)  # a KL in nats per token, not a relative error or a sum over tokens


def test_fisher_needs_factors_or_a_probe_for_every_group(tiny_models):
    from autocomp.sensitivity.fisher import FisherFactors
    from autocomp.config.space import SearchSpace
    from autocomp.pipeline.stitch import ModelStitcher
    from autocomp.sensitivity.table import sensitivity_table

    lm = load_model(str(tiny_models["llama"]))
    targets = find_targets(lm.model)
    space = SearchSpace.from_dict({"name": "s", "granularity": "uniform", "targets": {"embeddings": True},
                                   "quantization": {"methods": ["rtn"], "bits": [4, 16], "group_size": [32]}}, "s")
    stitcher = ModelStitcher(lm.model, targets, lm.fingerprint)
    with pytest.raises(ValueError, match="no Fisher factors"):
        sensitivity_table(space, space.select_targets(targets), stitcher, fisher=FisherFactors({}, {}))
