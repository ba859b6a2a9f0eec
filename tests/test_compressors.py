"""Compressors on every target layer of every tiny architecture: exact sparsity, exact N:M masks,
RTN code ranges / reconstruction, prune+quant interplay, determinism, error paths, and the protocol
contract every registered compressor must satisfy."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from optional_deps import llama_cpp_or_skip

from autocomp.pipeline.calibration import LayerStats, collect_input_stats
from autocomp.pipeline.layer import compress_weight
from autocomp.compressors.registry import (
    available_compressors,
    compressor_kind,
    compressor_needs_calibration,
    get_compressor,
)
from autocomp.compressors.rtn import QuantizedWeight, group_quantize_weight, n_groups
from autocomp.errors import PlanError
from autocomp.evaluators.size import kept_weights, layer_size
from autocomp.inputs.models import load_model
from autocomp.config.plan import LayerPlan, split_method
from autocomp.inputs.targets import find_targets, get_module, read_weight

ARCHS = ("llama", "gemma3", "gpt2", "opt", "qwen2")
RATIOS = (0.1, 0.25, 0.37, 0.5, 0.63, 0.9)
NM_PATTERNS = ((2, 4), (1, 4), (4, 8))
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, -1)


@dataclass
class ArchLayers:
    targets: list
    weights: dict      # name -> [out, in] float32 clone of the dense weight
    stats: dict        # name -> LayerStats (targets with a stats module only)


@pytest.fixture(scope="module")
def layers(tiny_models) -> dict[str, ArchLayers]:
    out = {}
    for arch in ARCHS:
        lm = load_model(str(tiny_models[arch]))
        targets = find_targets(lm.model)
        weights = {t.name: read_weight(get_module(lm.model, t.name)).clone().contiguous() for t in targets}
        for t in targets:
            assert tuple(weights[t.name].shape) == (t.out_features, t.in_features)
        gen = torch.Generator().manual_seed(1234)
        windows = torch.randint(3, len(lm.tokenizer), (3, 24), generator=gen)
        stats = _collect(lm.model, targets, windows)
        out[arch] = ArchLayers(targets, weights, stats)
    return out


def _rand(out_f: int, in_f: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g).to(dtype)


def _rand_stats(in_f: int, seed: int = 1) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    return LayerStats(torch.rand(in_f, generator=g, dtype=torch.float64) * 10 + 0.1, 32)


def _activation_stats(in_f: int, seed: int = 2, tokens: int = 256) -> LayerStats:
    """Statistics of random inputs, consistent with each other: per-feature sums of squares and,
    for methods that need it, the Hessian ``2 X^T X / n``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64) * (torch.rand(in_f, generator=g, dtype=torch.float64) + 0.2)
    stats = LayerStats(x.pow(2).sum(dim=0), tokens)
    if hasattr(stats, "hessian"):
        stats.hessian = (2.0 * x.t() @ x / tokens).to(torch.float32)
    return stats


def _collect(model, targets, windows) -> dict:
    """Input statistics, with Hessians when this autocomp collects them (for Hessian-based methods)."""
    import inspect

    if "hessian" in inspect.signature(collect_input_stats).parameters:
        return collect_input_stats(model, targets, windows, hessian=True)
    return collect_input_stats(model, targets, windows)


# ---------------------------------------------------------------------------------------------
# the fixture itself
# ---------------------------------------------------------------------------------------------

def test_fixture_covers_expected_layers(layers):
    # every arch has targets, gpt2 layers are Conv1D, and wanda statistics exist for every layer
    # that has an input of its own (all but the untied llama input embedding).
    assert {t.kind for t in layers["gpt2"].targets} >= {"conv1d", "embedding"}
    for arch, al in layers.items():
        assert len(al.targets) >= 9, arch
        for t in al.targets:
            if t.stats_module is not None:
                st = al.stats[t.name]
                assert st.input_sq_norm.shape == (t.in_features,)
                assert st.n_tokens == 3 * 24
                assert bool((st.input_sq_norm > 0).all())
    assert "model.embed_tokens" not in layers["llama"].stats
    assert "lm_head" in layers["llama"].stats


# ---------------------------------------------------------------------------------------------
# unstructured sparsity: exact counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_exact_unstructured_sparsity(layers, arch):
    al = layers[arch]
    for t in al.targets:
        w = al.weights[t.name]
        for s in RATIOS:
            res = compress_weight(w, LayerPlan(method="magnitude", sparsity=s))
            mask = res.mask
            assert mask.dtype == torch.bool and mask.shape == w.shape
            pruned = int((~mask).sum())
            assert pruned == round(w.numel() * s), (arch, t.name, s)
            # pruned weights are zero, kept weights untouched
            assert bool((res.weight[~mask] == 0).all())
            assert torch.equal(res.weight[mask], w[mask])
            # the pruned ones are the smallest in magnitude (over the whole tensor)
            assert float(w[~mask].abs().max()) <= float(w[mask].abs().min())


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_exact_per_row_sparsity(layers, arch):
    al = layers[arch]
    checked = 0
    for t in al.targets:
        if t.name not in al.stats:
            continue
        w = al.weights[t.name]
        st = al.stats[t.name]
        score = w.abs() * st.input_sq_norm.float().sqrt().unsqueeze(0)
        for s in RATIOS:
            res = compress_weight(w, LayerPlan(method="wanda", sparsity=s), st)
            mask = res.mask
            per_row = (~mask).sum(dim=1)
            k = round(t.in_features * s)
            assert bool((per_row == k).all()), (arch, t.name, s, per_row.tolist()[:4])
            assert int((~mask).sum()) == t.out_features * k
            assert bool((res.weight[~mask] == 0).all())
            assert torch.equal(res.weight[mask], w[mask])
            # within each row, every pruned score <= every kept score
            pruned_max = torch.where(~mask, score, torch.full_like(score, -1.0)).amax(dim=1)
            kept_min = torch.where(mask, score, torch.full_like(score, float("inf"))).amin(dim=1)
            assert bool((pruned_max <= kept_min).all())
        checked += 1
    assert checked >= 9


def test_exact_counts_hand_values(layers):
    # llama q_proj is 64x64 = 4096 weights: 4096 * 0.37 = 1515.52 -> 1516 pruned per tensor;
    # per row 64 * 0.37 = 23.68 -> 24, times 64 rows = 1536.
    al = layers["llama"]
    name = "model.layers.0.self_attn.q_proj"
    w = al.weights[name]
    assert w.shape == (64, 64)
    mag = compress_weight(w, LayerPlan(method="magnitude", sparsity=0.37))
    assert int((~mag.mask).sum()) == 1516
    wan = compress_weight(w, LayerPlan(method="wanda", sparsity=0.37), al.stats[name])
    assert int((~wan.mask).sum()) == 1536
    # down_proj 64x128: per row 128 * 0.37 = 47.36 -> 47, 64 * 47 = 3008; per tensor 8192*0.37 = 3031.04 -> 3031
    name = "model.layers.1.mlp.down_proj"
    w = al.weights[name]
    assert int((~compress_weight(w, LayerPlan(method="wanda", sparsity=0.37), al.stats[name]).mask).sum()) == 3008
    assert int((~compress_weight(w, LayerPlan(method="magnitude", sparsity=0.37)).mask).sum()) == 3031


def test_exact_counts_with_ties():
    # all-equal magnitudes: a threshold would prune all or nothing; rank selection is exact
    w = torch.ones(8, 40)
    res = compress_weight(w, LayerPlan(method="magnitude", sparsity=0.37))
    assert int((~res.mask).sum()) == round(320 * 0.37) == 118
    st = LayerStats(torch.ones(40, dtype=torch.float64), 4)
    res = compress_weight(w, LayerPlan(method="wanda", sparsity=0.37), st)
    assert ((~res.mask).sum(dim=1) == round(40 * 0.37)).all()
    assert int((~res.mask).sum()) == 8 * 15


# ---------------------------------------------------------------------------------------------
# N:M
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_masks_exact(layers, arch, method):
    al = layers[arch]
    for t in al.targets:
        if method == "wanda" and t.name not in al.stats:
            continue
        w = al.weights[t.name]
        st = al.stats.get(t.name)
        score = w.abs() if method == "magnitude" else w.abs() * st.input_sq_norm.float().sqrt().unsqueeze(0)
        for n, m in NM_PATTERNS:
            lp = LayerPlan(method=method, pattern=f"{n}:{m}")
            assert lp.sparsity == pytest.approx(1 - n / m)
            res = compress_weight(w, lp, st)
            blocks = res.mask.reshape(t.out_features, t.in_features // m, m)
            # count mask entries (kept), not nonzeros of the weight
            assert bool((blocks.sum(dim=2) == n).all()), (arch, t.name, n, m)
            assert int(res.mask.sum()) == t.numel * n // m
            assert bool((res.weight[~res.mask] == 0).all())
            assert torch.equal(res.weight[res.mask], w[res.mask])
            # the kept ones are the top-n scores of their block
            sb = score.reshape(t.out_features, t.in_features // m, m)
            kept_min = torch.where(blocks, sb, torch.full_like(sb, float("inf"))).amin(dim=2)
            pruned_max = torch.where(~blocks, sb, torch.full_like(sb, -1.0)).amax(dim=2)
            assert bool((pruned_max <= kept_min).all())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("shape,pattern", [((8, 50), "2:4"), ((8, 68), "4:8"), ((4, 30), "1:4")])
def test_nm_needs_multiple_of_m(method, shape, pattern):
    w = _rand(*shape)
    st = _rand_stats(shape[1])
    with pytest.raises(PlanError, match=r"multiple of \d"):
        compress_weight(w, LayerPlan(method=method, pattern=pattern), st)
    with pytest.raises(PlanError):
        compress_weight(w, LayerPlan(method=f"{method}+rtn", pattern=pattern, bits=4), st)


# ---------------------------------------------------------------------------------------------
# wanda specifics
# ---------------------------------------------------------------------------------------------

def test_wanda_uses_activations(layers):
    al = layers["llama"]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = al.weights[name]
        in_f = w.shape[1]
        # the input column with the smallest weights: magnitude pruning drops most of it
        col = int(w.abs().sum(dim=0).argmin())
        norm = torch.ones(in_f, dtype=torch.float64)
        norm[col] = 1e12
        st = LayerStats(norm, 10)
        for s in (0.5, 0.9):
            mag = compress_weight(w, LayerPlan(method="magnitude", sparsity=s))
            assert int((~mag.mask[:, col]).sum()) > 0  # the test discriminates
            wan = compress_weight(w, LayerPlan(method="wanda", sparsity=s), st)
            assert bool(wan.mask[:, col].all()), (name, s)
        wan = compress_weight(w, LayerPlan(method="wanda", pattern="2:4"), st)
        assert bool(wan.mask[:, col].all())
        # with a uniform activation norm wanda is per-row magnitude pruning
        flat = LayerStats(torch.full((in_f,), 7.0, dtype=torch.float64), 10)
        wan = compress_weight(w, LayerPlan(method="wanda", sparsity=0.5), flat)
        k = round(in_f * 0.5)
        expect = torch.ones_like(w, dtype=torch.bool)
        expect.scatter_(1, torch.topk(w.abs(), k, dim=1, largest=False).indices, False)
        assert torch.equal(wan.mask, expect)
        # and real statistics give a different mask than plain per-row magnitude
        real = compress_weight(w, LayerPlan(method="wanda", sparsity=0.5), al.stats[name])
        assert not torch.equal(real.mask, expect)


def test_wanda_without_stats_raises(layers):
    w = _rand(16, 64)
    with pytest.raises(PlanError, match="wanda needs calibration"):
        compress_weight(w, LayerPlan(method="wanda", sparsity=0.5), None)
    with pytest.raises(PlanError, match="wanda needs calibration"):
        compress_weight(w, LayerPlan(method="wanda+rtn", sparsity=0.5, bits=4), None)
    with pytest.raises(PlanError, match="wanda needs calibration"):
        compress_weight(w, LayerPlan(method="wanda", pattern="2:4"), LayerStats(None, 0))
    with pytest.raises(PlanError, match="input features"):
        compress_weight(w, LayerPlan(method="wanda", sparsity=0.5), _rand_stats(32))
    # the untied llama input embedding has no activations of its own
    al = layers["llama"]
    with pytest.raises(PlanError):
        compress_weight(al.weights["model.embed_tokens"], LayerPlan(method="wanda", sparsity=0.5),
                        al.stats.get("model.embed_tokens"))


# ---------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------

def _expand_groups(per_group: torch.Tensor, gs: int, in_f: int) -> torch.Tensor:
    return per_group.repeat_interleave(gs, dim=1)[:, :in_f]


def _check_ggml(w: torch.Tensor, qw: QuantizedWeight, bits: int) -> None:
    """llama.cpp's blocks: the type its width and rows name, the bytes its size accounts, the weight
    exactly what ggml de-quantizes them to, and close to the input."""
    from autocomp.compressors.ggml import dequantize_rows, ggml_type, row_bytes

    out_f, in_f = w.shape
    assert qw.bits == bits and qw.ggml_type == ggml_type(bits, in_f) and qw.zeros is None
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (out_f, row_bytes(qw.ggml_type, in_f))
    assert layer_size(out_f, in_f, LayerPlan(method="ggml", bits=bits)).bytes == qw.codes.numel()
    assert torch.equal(dequantize_rows(qw.codes, qw.ggml_type, in_f), qw.weight)
    assert float((qw.weight - w).pow(2).mean()) < 0.2 * float(w.pow(2).mean()), qw.ggml_type


def _check_quantized(w: torch.Tensor, qw: QuantizedWeight, bits: int, group_size: int, symmetric: bool,
                     nearest: bool = True) -> None:
    if qw.ggml_type is not None:
        return _check_ggml(w, qw, bits)
    out_f, in_f = w.shape
    maxq = 2 ** bits - 1
    gs = in_f if group_size == -1 or group_size > in_f else group_size
    ng = -(-in_f // gs)
    assert qw.bits == bits and qw.group_size == gs
    assert qw.weight.shape == w.shape and qw.weight.dtype == torch.float32
    assert qw.codes.shape == w.shape and qw.codes.dtype == torch.uint8
    assert qw.scales.shape == (out_f, ng) and qw.scales.dtype == torch.float16
    assert bool((qw.scales > 0).all())
    assert int(qw.codes.max()) <= maxq  # uint8: >= 0 by type
    if symmetric:
        assert qw.zeros is None
        zero = torch.full((out_f, in_f), float(2 ** (bits - 1)))
    else:
        assert qw.zeros is not None and qw.zeros.shape == (out_f, ng) and qw.zeros.dtype == torch.uint8
        assert int(qw.zeros.max()) <= maxq
        zero = _expand_groups(qw.zeros.float(), gs, in_f)
    scale = _expand_groups(qw.scales.float(), gs, in_f)
    # dequantized = (codes - zero) * scale, exactly
    assert torch.equal((qw.codes.float() - zero) * scale, qw.weight)
    # each group holds at most 2^bits distinct codes / values
    for g in range(ng):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        for t in (qw.codes[:, cols].float(), qw.weight[:, cols]):
            srt = t.sort(dim=1).values
            distinct = (srt[:, 1:] != srt[:, :-1]).sum(dim=1) + 1
            assert int(distinct.max()) <= 2 ** bits
    # round to nearest: asymmetric keeps every value within about one step of the original
    if nearest and not symmetric:
        assert bool(((qw.weight - w).abs() <= scale * 1.0 + 1e-6).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_codes_values_and_error(layers, arch):
    al = layers[arch]
    for t in al.targets:
        w = al.weights[t.name]
        for symmetric in (False, True):
            for gs in GROUP_SIZES:
                errors = []
                for bits in BITS:
                    lp = LayerPlan(method="rtn", bits=bits, group_size=gs, symmetric=symmetric)
                    res = compress_weight(w, lp)
                    assert res.mask is None
                    qw = res.quant
                    _check_quantized(w, qw, bits, gs, symmetric)
                    assert torch.equal(res.weight, qw.weight)
                    errors.append(float((res.weight - w).pow(2).sum()))
                assert all(a > b for a, b in zip(errors, errors[1:])), (arch, t.name, symmetric, gs, errors)
                assert errors[-1] < 1e-3 * float(w.pow(2).sum())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_rtn_ragged_and_oversized_groups(bits, symmetric):
    w = _rand(12, 200, seed=bits)
    for gs, groups in ((128, 2), (64, 4), (32, 7), (-1, 1), (512, 1)):
        assert n_groups(200, gs) == groups
        qw = compress_weight(w, LayerPlan(method="rtn", bits=bits, group_size=gs, symmetric=symmetric)).quant
        assert qw.scales.shape == (12, groups)
        _check_quantized(w, qw, bits, gs, symmetric)


def test_rtn_zero_is_exact_and_constant_group():
    # a group of zeros, a constant positive group and one with a single nonzero
    w = torch.zeros(3, 64)
    w[1] = 0.25
    w[2, 5] = -3.0
    for symmetric in (False, True):
        for bits in BITS:
            qw = compress_weight(w, LayerPlan(method="rtn", bits=bits, group_size=32, symmetric=symmetric)).quant
            _check_quantized(w, qw, bits, 32, symmetric)
            assert bool((qw.weight[0] == 0).all())
            assert bool((qw.weight[2][w[2] == 0] == 0).all())
            assert bool(torch.isfinite(qw.weight).all())


# ---------------------------------------------------------------------------------------------
# sparsity + quantization
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_prune_then_quantize_keeps_mask(layers, arch):
    al = layers[arch]
    configs = [
        dict(method="magnitude+rtn", sparsity=0.37, bits=4, group_size=32),
        dict(method="magnitude+rtn", pattern="2:4", bits=3, group_size=-1, symmetric=True),
        dict(method="wanda+rtn", sparsity=0.5, bits=4, group_size=64),
        dict(method="wanda+rtn", pattern="4:8", bits=2, group_size=128, symmetric=True),
        dict(method="wanda+rtn", sparsity=0.63, bits=8, group_size=32, symmetric=True),
    ]
    for t in al.targets:
        w = al.weights[t.name]
        st = al.stats.get(t.name)
        for cfg in configs:
            lp = LayerPlan(**cfg)
            if lp.pruner == "wanda" and st is None:
                continue
            res = compress_weight(w, lp, st)
            prune_only = compress_weight(w, LayerPlan(method=lp.pruner, sparsity=lp.sparsity, pattern=lp.pattern), st)
            # the mask is the pruner's mask, and pruned weights are exactly zero after quantization
            assert torch.equal(res.mask, prune_only.mask)
            assert bool((res.weight[~res.mask] == 0).all())
            assert int((res.weight != 0).sum()) <= int(res.mask.sum())
            if lp.nm:
                n, m = lp.nm
                assert bool((res.mask.reshape(t.out_features, -1, m).sum(dim=2) == n).all())
            else:
                assert int((~res.mask).sum()) == int((~prune_only.mask).sum())
            # quantization sees the pruned weight: same as quantizing it directly with the mask
            direct = group_quantize_weight(prune_only.weight, lp.bits, lp.group_size, lp.symmetric, mask=res.mask)
            assert torch.equal(res.weight, direct.weight)
            assert torch.equal(res.quant.scales, direct.scales)
            _check_quantized(prune_only.weight, res.quant, lp.bits, lp.group_size, lp.symmetric)


def test_pruned_weights_excluded_from_range():
    # a huge weight that is pruned must not widen the quantization range of its group
    w = _rand(4, 32, seed=3) * 0.01
    w[:, 0] = 1e-6  # smallest magnitude: pruned below
    big = w.clone()
    big[:, 0] = 1e-7
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 0] = False
    huge = w.clone()
    huge[:, 0] = 100.0
    a = group_quantize_weight(huge, 4, 32, False, mask=mask)
    b = group_quantize_weight(w, 4, 32, False, mask=mask)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.weight, b.weight)
    assert bool((a.weight[:, 0] == 0).all())


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compressors_deterministic(layers, arch):
    al = layers[arch]
    plans = [
        LayerPlan(method="magnitude", sparsity=0.37),
        LayerPlan(method="magnitude", pattern="2:4"),
        LayerPlan(method="wanda", sparsity=0.5),
        LayerPlan(method="wanda+rtn", pattern="1:4", bits=3, group_size=32),
        LayerPlan(method="rtn", bits=5, group_size=-1, symmetric=True),
        LayerPlan(method="magnitude+rtn", sparsity=0.25, bits=6, group_size=64),
    ]
    for t in al.targets:
        if t.name not in al.stats:
            continue
        w = al.weights[t.name]
        before = w.clone()
        for lp in plans:
            a = compress_weight(w, lp, al.stats[t.name])
            b = compress_weight(w.clone(), lp, LayerStats(al.stats[t.name].input_sq_norm.clone(), 1))
            assert torch.equal(a.weight, b.weight), (t.name, lp)
            assert (a.mask is None) == (b.mask is None)
            if a.mask is not None:
                assert torch.equal(a.mask, b.mask)
            if a.quant is not None:
                assert torch.equal(a.quant.codes, b.quant.codes)
                assert torch.equal(a.quant.scales, b.quant.scales)
        assert torch.equal(w, before)  # the input is never modified


# ---------------------------------------------------------------------------------------------
# the contract every registered compressor must satisfy
# ---------------------------------------------------------------------------------------------

def _plans_for(name: str) -> list[LayerPlan]:
    """The plans a compressor must handle: alone, and combined with every compressor of the other kind."""
    entry = get_compressor(name)
    if entry.kind == "prune":
        plans = [LayerPlan(method=name, sparsity=0.37), LayerPlan(method=name, pattern="2:4")]
        for q in (q for q in available_compressors("quant") if get_compressor(q).holds_pruned):
            plans.append(LayerPlan(method=f"{name}+{q}", sparsity=0.5, bits=4, group_size=32))
            plans.append(LayerPlan(method=f"{name}+{q}", pattern="4:8", bits=3, group_size=-1, symmetric=True))
        return plans
    plans = [LayerPlan(method=name, bits=4, group_size=32), LayerPlan(method=name, bits=3, group_size=-1, symmetric=True)]
    if not entry.holds_pruned:      # llama.cpp's blocks: no pruner before it (LayerPlan refuses the pair)
        return plans
    for p in available_compressors("prune"):
        plans.append(LayerPlan(method=f"{p}+{name}", sparsity=0.5, bits=8, group_size=64))
        plans.append(LayerPlan(method=f"{p}+{name}", pattern="2:4", bits=4, group_size=32, symmetric=True))
    return plans


def _raw_mask(result) -> torch.Tensor:
    """A pruner returns a keep-mask, or (a reconstructing pruner) an object carrying one."""
    return result if isinstance(result, torch.Tensor) else result.mask


def test_builtin_compressors_registered():
    assert set(available_compressors()) >= {"magnitude", "wanda", "rtn"}
    assert set(available_compressors("prune")) >= {"magnitude", "wanda"}
    assert "rtn" in available_compressors("quant")
    assert set(available_compressors("prune")) & set(available_compressors("quant")) == set()
    with pytest.raises(PlanError, match="unknown compression method 'nope'"):
        get_compressor("nope")


@pytest.mark.parametrize("name", available_compressors())
def test_compressor_contract(name, layers):
    from autocomp.compressors.ggml import GGML_METHODS

    if name in GGML_METHODS:
        llama_cpp_or_skip()
    entry = get_compressor(name)
    # registry metadata is consistent
    assert entry.name == name
    assert entry.kind in ("prune", "quant")
    assert compressor_kind(name) == entry.kind
    assert name in available_compressors(entry.kind)
    assert compressor_needs_calibration(name) == entry.needs_calibration
    assert entry.data_free == (not entry.needs_calibration)
    if getattr(entry, "needs_hessian", False):
        assert entry.needs_calibration
    assert callable(entry.fn)
    if entry.kind == "prune":
        assert entry.prune_group in ("tensor", "row")
        assert split_method(name) == (name, None)
        assert split_method(f"{name}+rtn") == (name, "rtn")
    else:
        assert entry.prune_group == ""
        assert split_method(name) == (None, name)
        assert split_method(f"magnitude+{name}") == ("magnitude", name)

    gpt2 = layers["gpt2"]
    real = gpt2.weights["transformer.h.0.mlp.c_proj"]  # a Conv1D layer, [64, 256] as [out, in]
    cases = [(_rand(48, 64, seed=5), _activation_stats(64)),
             (real, gpt2.stats["transformer.h.0.mlp.c_proj"])]
    for w0, st in cases:
        out_f, in_f = w0.shape
        # raw entry point
        if entry.kind == "prune":
            res = entry.fn(w0.clone(), 0.37, None, st)
            mask = _raw_mask(res)
            assert mask.dtype == torch.bool and mask.shape == w0.shape
            assert int(mask.sum()) == kept_weights(out_f, in_f, LayerPlan(method=name, sparsity=0.37))
            mask_nm = _raw_mask(entry.fn(w0.clone(), 0.5, (2, 4), st))
            assert bool((mask_nm.reshape(out_f, -1, 4).sum(dim=2) == 2).all())
            assert torch.equal(_raw_mask(entry.fn(w0.clone(), 0.37, None, st)), mask)
            if entry.data_free:  # data-free: statistics must not matter
                assert torch.equal(_raw_mask(entry.fn(w0.clone(), 0.37, None, None)), mask)
                assert torch.equal(_raw_mask(entry.fn(w0.clone(), 0.37, None, _activation_stats(in_f, seed=9))), mask)
        else:
            qw = entry.fn(w0.clone(), 4, 32, False, mask=None, stats=st)
            assert isinstance(qw, QuantizedWeight)
            _check_quantized(w0, qw, 4, 32, False, nearest=entry.data_free)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = w0.to(dtype)
            before = w.clone()
            for lp in _plans_for(name):
                a = compress_weight(w, lp, st)
                b = compress_weight(w.clone(), lp, st)
                assert a.weight.shape == w.shape and a.weight.dtype == dtype, (lp, dtype)
                assert torch.equal(a.weight, b.weight), (lp, dtype)  # deterministic
                assert torch.equal(w, before)                         # input untouched
                assert not torch.equal(a.weight, w)                   # it did something
                if lp.pruner is not None:
                    assert a.mask is not None and a.mask.shape == w.shape
                    assert torch.equal(a.mask, b.mask)
                    assert int(a.mask.sum()) == kept_weights(out_f, in_f, lp), lp  # size known without running it
                    if lp.nm:
                        assert bool((a.mask.reshape(out_f, -1, lp.nm[1]).sum(dim=2) == lp.nm[0]).all())
                    assert bool((a.weight[~a.mask] == 0).all()), lp
                else:
                    assert a.mask is None
                if lp.quantizer is not None:
                    assert a.quant is not None and a.quant.bits == lp.bits
                    assert torch.equal(a.weight, a.quant.weight.to(dtype))
                    assert torch.equal(a.quant.codes, b.quant.codes)
                    _check_quantized(w.float(), a.quant, lp.bits, lp.group_size, lp.symmetric, nearest=False)
                else:
                    assert a.quant is None
    # a method that needs calibration fails cleanly, with PlanError, without statistics
    if entry.needs_calibration:
        for lp in _plans_for(name)[:2]:
            with pytest.raises(PlanError):
                compress_weight(_rand(8, 64), lp, None)
    # dense passes through unchanged
    w = _rand(8, 64)
    dense = compress_weight(w, LayerPlan())
    assert torch.equal(dense.weight, w) and dense.mask is None and dense.quant is None
