"""Size accounting against hand-computed bytes, per layer and for whole tiny models."""

from __future__ import annotations

import math

import pytest
from tiny import cycle_plan
import torch

from autocomp.pipeline.calibration import LayerStats
from autocomp.pipeline.layer import compress_weight
from autocomp.evaluators.size import MB, kept_weights, layer_size, model_size
from autocomp.inputs.models import load_model
from autocomp.config.plan import LayerPlan
from autocomp.inputs.targets import find_targets, get_module

ARCHS = ("llama", "gemma3", "gpt2", "opt", "qwen2")


def _check_kept_against_compressor(out_f: int, in_f: int, lp: LayerPlan, expected_kept: int) -> None:
    """What the size module assumes is what the compressor actually keeps."""
    assert kept_weights(out_f, in_f, lp) == expected_kept
    if lp.pruner is None:
        return
    g = torch.Generator().manual_seed(out_f * 1000 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    stats = LayerStats(torch.rand(in_f, generator=g, dtype=torch.float64) + 0.5, 8)
    res = compress_weight(w, lp, stats)
    assert int(res.mask.sum()) == expected_kept


# ---------------------------------------------------------------------------------------------
# one layer, arithmetic written out
# ---------------------------------------------------------------------------------------------

def test_dense_16bit():
    # 64 x 128 weights at 16 bits = 131072 bits = 16384 bytes
    ls = layer_size(64, 128, LayerPlan())
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (131072, 0, 0, 0)
    assert ls.bytes == 16384
    # an odd shape: 7 x 9 = 63 weights * 2 bytes = 126
    assert layer_size(7, 9, LayerPlan()).bytes == 126


def test_rtn_4bit_g128_asymmetric():
    # [64, 256]: numel 16384 -> values 16384 * 4 = 65536 bits
    # groups: 64 rows * (256 / 128) = 128 -> scales 128 * 16 = 2048 bits, zeros 128 * 4 = 512 bits
    # total 65536 + 2048 + 512 = 68096 bits = 8512 bytes
    lp = LayerPlan(method="rtn", bits=4, group_size=128)
    ls = layer_size(64, 256, lp)
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (65536, 2048, 512, 0)
    assert ls.bytes == 8512
    _check_kept_against_compressor(64, 256, lp, 16384)


def test_rtn_4bit_g128_symmetric_has_no_zero_points():
    # as above without zeros: 65536 + 2048 = 67584 bits = 8448 bytes
    ls = layer_size(64, 256, LayerPlan(method="rtn", bits=4, group_size=128, symmetric=True))
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (65536, 2048, 0, 0)
    assert ls.bytes == 8448


def test_rtn_per_channel():
    # group_size -1: one group per output row -> 64 groups
    # 4-bit asym on [64, 256]: 65536 + 64 * 16 + 64 * 4 = 65536 + 1024 + 256 = 66816 bits = 8352 bytes
    ls = layer_size(64, 256, LayerPlan(method="rtn", bits=4, group_size=-1))
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits) == (65536, 1024, 256)
    assert ls.bytes == 8352
    # a group size larger than the row is also one group per row
    assert layer_size(64, 256, LayerPlan(method="rtn", bits=4, group_size=512)).bytes == 8352
    # 8-bit symmetric per channel on [32, 64]: 2048 * 8 + 32 * 16 = 16384 + 512 = 16896 bits = 2112 bytes
    assert layer_size(32, 64, LayerPlan(method="rtn", bits=8, group_size=-1, symmetric=True)).bytes == 2112


def test_rtn_ragged_last_group_and_ceil_to_bytes():
    # [10, 200], 3-bit g128 asym: ceil(200 / 128) = 2 groups per row -> 20 groups
    # values 2000 * 3 = 6000, scales 20 * 16 = 320, zeros 20 * 3 = 60 -> 6380 bits = 797.5 -> 798 bytes
    lp = LayerPlan(method="rtn", bits=3, group_size=128)
    ls = layer_size(10, 200, lp)
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (6000, 320, 60, 0)
    assert ls.bytes == 798
    # g64 on 200 inputs: ceil(200/64) = 4 groups per row -> 40 groups: 6000 + 640 + 120 = 6760 bits = 845 bytes
    assert layer_size(10, 200, LayerPlan(method="rtn", bits=3, group_size=64)).bytes == 845
    # and the quantizer really stores that many scales
    w = torch.randn(10, 200)
    assert compress_weight(w, lp).quant.scales.shape == (10, 2)
    assert compress_weight(w, LayerPlan(method="rtn", bits=3, group_size=64)).quant.scales.shape == (10, 4)


def test_magnitude_unstructured_bitmask():
    # [64, 128] at 50%: numel 8192, pruned 4096, kept 4096
    # kept * 16 = 65536 bits + bitmask 8192 bits = 73728 bits = 9216 bytes
    lp = LayerPlan(method="magnitude", sparsity=0.5)
    ls = layer_size(64, 128, lp)
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (65536, 0, 0, 8192)
    assert ls.bytes == 9216
    _check_kept_against_compressor(64, 128, lp, 4096)
    # [30, 60] at 0.37, per tensor: 1800 * 0.37 = 666 pruned, 1134 kept
    # 1134 * 16 + 1800 = 18144 + 1800 = 19944 bits = 2493 bytes
    lp = LayerPlan(method="magnitude", sparsity=0.37)
    assert layer_size(30, 60, lp).bytes == 2493
    _check_kept_against_compressor(30, 60, lp, 1134)
    # [7, 9] at 0.3: 63 * 0.3 = 18.9 -> 19 pruned, 44 kept: 44 * 16 + 63 = 767 bits = 95.875 -> 96 bytes
    lp = LayerPlan(method="magnitude", sparsity=0.3)
    assert layer_size(7, 9, lp).bytes == 96
    _check_kept_against_compressor(7, 9, lp, 44)


def test_wanda_counts_per_row():
    # [30, 60] at 0.37, per row: 60 * 0.37 = 22.2 -> 22 pruned per row, 38 kept -> 30 * 38 = 1140 kept
    # 1140 * 16 + 1800 = 18240 + 1800 = 20040 bits = 2505 bytes (differs from magnitude's 2493)
    lp = LayerPlan(method="wanda", sparsity=0.37)
    assert layer_size(30, 60, lp).bytes == 2505
    _check_kept_against_compressor(30, 60, lp, 1140)


@pytest.mark.parametrize("pattern,kept,index_bits,expected_bytes", [
    # [64, 128]: 2:4 keeps 4096; 4096 * 16 + 4096 * 2 = 65536 + 8192 = 73728 bits = 9216 bytes
    ("2:4", 4096, 2, 9216),
    # 1:4 keeps 2048; 2048 * 16 + 2048 * 2 = 32768 + 4096 = 36864 bits = 4608 bytes
    ("1:4", 2048, 2, 4608),
    # 4:8 keeps 4096; 4096 * 16 + 4096 * 3 = 65536 + 12288 = 77824 bits = 9728 bytes
    ("4:8", 4096, 3, 9728),
])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_index_bits(method, pattern, kept, index_bits, expected_bytes):
    lp = LayerPlan(method=method, pattern=pattern)
    ls = layer_size(64, 128, lp)
    assert ls.values_bits == kept * 16
    assert ls.meta_bits == kept * index_bits
    assert (ls.scale_bits, ls.zero_bits) == (0, 0)
    assert ls.bytes == expected_bytes
    _check_kept_against_compressor(64, 128, lp, kept)


def test_wanda_rtn_sparse_and_quantized():
    # [64, 128], wanda 50% + rtn 4-bit g128 asym:
    # per row 64 pruned -> kept 64 * 64 = 4096; values 4096 * 4 = 16384 bits
    # groups 64 * ceil(128 / 128) = 64 -> scales 1024 bits, zeros 256 bits; bitmask 8192 bits
    # total 16384 + 1024 + 256 + 8192 = 25856 bits = 3232 bytes
    lp = LayerPlan(method="wanda+rtn", sparsity=0.5, bits=4, group_size=128)
    ls = layer_size(64, 128, lp)
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (16384, 1024, 256, 8192)
    assert ls.bytes == 3232
    _check_kept_against_compressor(64, 128, lp, 4096)
    # magnitude 2:4 + rtn 3-bit sym g64 on [64, 128]: kept 4096 -> 12288 value bits, 64 * 2 = 128 groups
    # -> 2048 scale bits, no zeros, 4096 * 2 = 8192 index bits: 22528 bits = 2816 bytes
    lp = LayerPlan(method="magnitude+rtn", pattern="2:4", bits=3, group_size=64, symmetric=True)
    ls = layer_size(64, 128, lp)
    assert (ls.values_bits, ls.scale_bits, ls.zero_bits, ls.meta_bits) == (12288, 2048, 0, 8192)
    assert ls.bytes == 2816


def test_base_bits():
    # a dense layer at base 32 bits: 64 * 64 * 4 bytes = 16384; rtn layers are unaffected by base bits
    assert layer_size(64, 64, LayerPlan(), base_bits=32).bytes == 16384
    lp = LayerPlan(method="rtn", bits=4, group_size=64)
    assert layer_size(64, 64, lp, base_bits=32).bytes == layer_size(64, 64, lp).bytes == (4096 * 4 + 64 * 16 + 64 * 4) // 8


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------

def _hand_layer_bits(out_f: int, in_f: int, lp: LayerPlan) -> int:
    """Independent re-statement of the storage format (see the arithmetic tests above)."""
    numel = out_f * in_f
    if lp.method == "none":
        return numel * 16
    if lp.nm is not None:
        n, m = lp.nm
        kept = out_f * (in_f // m) * n
    elif lp.pruner == "wanda":
        kept = out_f * (in_f - round(in_f * lp.sparsity))
    elif lp.pruner == "magnitude":
        kept = numel - round(numel * lp.sparsity)
    else:
        kept = numel
    bits = kept * (lp.bits if lp.quantizer else 16)
    if lp.quantizer:
        gs = in_f if lp.group_size == -1 else min(lp.group_size, in_f)
        groups = out_f * math.ceil(in_f / gs)
        bits += groups * 16 + (0 if lp.symmetric else groups * lp.bits)
    if lp.pruner:
        bits += kept * math.ceil(math.log2(lp.nm[1])) if lp.nm else numel
    return bits


def _unique_numel(model) -> int:
    by_storage = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        by_storage[p.data_ptr()] = p.numel()
    return sum(by_storage.values())


@pytest.fixture(scope="module")
def models(tiny_models):
    out = {}
    for arch in ARCHS:
        lm = load_model(str(tiny_models[arch]))
        out[arch] = (lm.model, find_targets(lm.model))
    return out


def test_param_counts_by_hand(models):
    # llama (untied): embed 384*64 = 24576 and lm_head 24576; per block q 64*64 + k 32*64 + v 32*64 + o 64*64
    # + gate/up/down 3 * 128*64 + 2 norms * 64 = 4096+2048+2048+4096+24576+128 = 36992; 2 blocks; final norm 64
    llama = 2 * 24576 + 2 * 36992 + 64
    assert llama == 123200
    # gemma3 (tied, counted once): embed 24576; per block q 4096 + k 16*64 + v 16*64 + o 4096 + mlp 24576
    # + 4 norms * 64 + q_norm/k_norm 2 * 16 = 34816 + 256 + 32 = 35104; 2 blocks; final norm 64
    gemma3 = 24576 + 2 * 35104 + 64
    assert gemma3 == 94848
    model, targets = models["llama"]
    assert _unique_numel(model) == llama
    assert model_size(model, targets, {}).dense_bytes == llama * 2
    model, targets = models["gemma3"]
    assert _unique_numel(model) == gemma3
    assert model_size(model, targets, {}).total_bytes == gemma3 * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_model_size(models, arch):
    model, targets = models[arch]
    unique = _unique_numel(model)
    rep = model_size(model, targets, {})
    assert rep.dense_bytes == unique * 2
    assert rep.total_bytes == unique * 2
    assert rep.compression_ratio == 1.0
    assert rep.size_mb == unique * 2 / MB
    assert set(rep.per_layer) == {t.name for t in targets}
    for t in targets:
        assert rep.per_layer[t.name] == t.numel * 2
    # the tied archs share embedding and LM head; llama does not
    tied = arch != "llama"
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (emb is head) == tied
    all_numel = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert all_numel - unique == (emb.numel() if tied else 0)
    assert len([t for t in targets if not t.in_blocks]) == (1 if tied else 2)


SIZE_MENU = [
    LayerPlan(method="rtn", bits=4, group_size=128),
    LayerPlan(method="magnitude", sparsity=0.37),
    LayerPlan(method="wanda+rtn", sparsity=0.5, bits=3, group_size=32, symmetric=True),
    LayerPlan(),
    LayerPlan(method="magnitude+rtn", pattern="2:4", bits=8, group_size=-1),
    LayerPlan(method="wanda", pattern="4:8"),
    LayerPlan(method="rtn", bits=6, group_size=64, symmetric=True),
]


def _mixed_plan(targets) -> dict[str, LayerPlan]:
    return cycle_plan(targets, SIZE_MENU, lambda t: LayerPlan(method="rtn", bits=8, group_size=32))


@pytest.mark.parametrize("arch", ARCHS)
def test_model_size_under_plan(models, arch):
    model, targets = models[arch]
    plan = _mixed_plan(targets)
    unique = _unique_numel(model)
    target_numel = sum(t.numel for t in targets)
    hand_layers = {t.name: math.ceil(_hand_layer_bits(t.out_features, t.in_features, plan[t.name]) / 8) for t in targets}
    rep = model_size(model, targets, plan)
    assert rep.per_layer == hand_layers
    untouched = unique - target_numel
    assert untouched > 0  # norms (and biases / positions) stay at 16 bits
    assert rep.total_bytes == untouched * 2 + sum(hand_layers.values())
    assert rep.dense_bytes == unique * 2
    assert rep.total_bytes < rep.dense_bytes
    assert rep.compression_ratio == pytest.approx(unique * 2 / rep.total_bytes)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_embedding_counted_once(models, arch):
    model, targets = models[arch]
    unique = _unique_numel(model)
    emb = model.get_input_embeddings().weight
    vocab, dim = emb.shape
    # only the embedding target compressed, 8-bit rtn g32 asym:
    # vocab * dim * 8 + vocab * (dim / 32) * (16 + 8) bits
    emb_name = next(t.name for t in targets if t.role == "embed")
    lp = LayerPlan(method="rtn", bits=8, group_size=32)
    emb_bytes = (vocab * dim * 8 + vocab * (dim // 32) * (16 + 8)) // 8
    rep = model_size(model, targets, {emb_name: lp})
    assert rep.per_layer[emb_name] == emb_bytes
    assert rep.total_bytes == (unique - vocab * dim) * 2 + emb_bytes
    # without the embedding among the targets it stays at 16 bits, once
    block_only = find_targets(model, embeddings=False)
    assert all(t.in_blocks for t in block_only)
    assert model_size(model, block_only, {}).total_bytes == unique * 2
    plan = {t.name: LayerPlan(method="rtn", bits=4, group_size=-1) for t in block_only}
    hand = sum(math.ceil((t.numel * 4 + t.out_features * (16 + 4)) / 8) for t in block_only)
    assert model_size(model, block_only, plan).total_bytes == (unique - sum(t.numel for t in block_only)) * 2 + hand


def test_conv1d_shapes_use_out_in(models):
    # gpt2 c_fc is stored [in=64, out=256]; sizes use [out, in]: rtn g32 -> 256 * (64/32) groups
    model, targets = models["gpt2"]
    t = next(t for t in targets if t.name == "transformer.h.0.mlp.c_fc")
    assert (t.out_features, t.in_features) == (256, 64)
    assert tuple(get_module(model, t.name).weight.shape) == (64, 256)
    rep = model_size(model, targets, {t.name: LayerPlan(method="rtn", bits=4, group_size=32)})
    # 16384 * 4 + 512 groups * (16 + 4) = 65536 + 10240 = 75776 bits = 9472 bytes
    assert rep.per_layer[t.name] == 9472
