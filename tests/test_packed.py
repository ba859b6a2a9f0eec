"""Packed export: bit streams, every layer format bit-exact with the simulation and as large as the size
accounting says, whole-model round trips (llama, GPT-2 Conv1D, Gemma 3 tied embedding), bytes on
disk against accounted bytes, and the named error for missing, foreign, corrupt or future files."""

from __future__ import annotations

import copy
import json
import math

import pytest
from tiny import cycle_plan
import torch

from autocomp.pipeline.calibration import LayerStats, collect_input_stats
from autocomp.pipeline.layer import compress_weight
from autocomp.pipeline.layer import CompressedWeight
from autocomp.compressors.rtn import QuantizedWeight
from autocomp.deploy import pack as pack_module
from autocomp.deploy.pack import (
    LayerFormat,
    PackedFormatError,
    pack_bits,
    pack_layer,
    tensors_nbytes,
    unpack_bits,
    unpack_layer,
)
from autocomp.deploy.packed_io import PACKED_FILE, load_packed, save_packed
from autocomp.errors import AutocompError, PlanError
from autocomp.evaluators.size import layer_size, model_size
from autocomp.inputs.models import load_model
from autocomp.config.plan import LayerPlan
from autocomp.inputs.targets import find_targets, get_module, read_weight, write_weight

# ---------------------------------------------------------------------------------------------
# bit streams
# ---------------------------------------------------------------------------------------------

LENGTHS = (0, 1, 3, 7, 8, 9, 15, 64, 1001)


def _reference_stream(values: list[int], bits: int) -> list[int]:
    """The little-endian bit stream written out one bit at a time (independent of pack_bits)."""
    stream = []
    for v in values:
        stream.extend((v >> k) & 1 for k in range(bits))
    stream.extend([0] * (-len(stream) % 8))
    return [sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip_and_exact_bytes(bits):
    g = torch.Generator().manual_seed(bits)
    for n in LENGTHS:
        values = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == math.ceil(n * bits / 8)
        assert packed.tolist() == _reference_stream(values.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, n), values)
    # the extreme values survive, from other integer dtypes too
    top = torch.tensor([(1 << bits) - 1, 0, (1 << bits) - 1], dtype=torch.int32)
    assert unpack_bits(pack_bits(top, bits), bits, 3).tolist() == top.tolist()


def test_pack_bits_by_hand():
    # 3-bit [1, 2, 7]: bits (lowest first) 100 010 111 -> byte 0 = 1,0,0,0,1,0,1,1 = 0xD1, byte 1 = 1
    assert pack_bits(torch.tensor([1, 2, 7]), 3).tolist() == [0xD1, 0x01]
    # 4-bit [0xA, 0x5] -> 0x5A; 1-bit bools, first value in the lowest bit
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    assert pack_bits(torch.tensor([True, False, False, True, True, False, False, False, True]), 1).tolist() == [0x19, 0x01]
    # 6-bit [63, 1]: 111111 100000 -> 0xFF... byte 0 = bits 0..7 = 1,1,1,1,1,1,1,0 = 0x7F, byte 1 = 0
    assert pack_bits(torch.tensor([63, 1]), 6).tolist() == [0x7F, 0x00]


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 7])
def test_pack_bits_across_chunks(monkeypatch, bits):
    # small chunks exercise the chunk boundaries (and a ragged last chunk) on small tensors
    monkeypatch.setattr(pack_module, "_CHUNK_VALUES", 64)
    g = torch.Generator().manual_seed(10 + bits)
    for n in (64, 65, 200, 517):
        values = torch.randint(0, 1 << bits, (n,), generator=g).to(torch.uint8)
        packed = pack_bits(values, bits)
        assert packed.tolist() == _reference_stream(values.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, n), values)


def test_pack_bits_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pack_bits(torch.tensor([-1, 1]), 1)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="4 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 10)


# ---------------------------------------------------------------------------------------------
# one layer: every format
# ---------------------------------------------------------------------------------------------

OUT_F, IN_F = 24, 320


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT_F, IN_F, generator=g) * 0.05


def _stats(seed: int = 3, tokens: int = 400) -> LayerStats:
    """Consistent statistics of random correlated inputs: sums of squares and the Hessian 2 X^T X / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, IN_F, generator=g, dtype=torch.float64) * (torch.rand(IN_F, generator=g, dtype=torch.float64) + 0.2)
    x[:, 1::2] += 0.5 * x[:, ::2]
    return LayerStats(x.pow(2).sum(dim=0), tokens, (2.0 * x.t() @ x / tokens).to(torch.float32))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells 0.0 from -0.0, and compares NaNs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def _expected_weight(cw: CompressedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What a packed layer must give back: quantized layers exactly, float values rounded to the storage dtype."""
    return cw.weight if cw.quant is not None else cw.weight.to(dtype).to(cw.weight.dtype)


def _check_layer(cw: CompressedWeight, plan: LayerPlan) -> dict[str, torch.Tensor]:
    packed = pack_layer(cw, plan)
    fmt = LayerFormat.from_plan(plan, OUT_F, IN_F)
    # through JSON, as the file stores it
    fmt = LayerFormat.from_dict(json.loads(json.dumps(fmt.to_dict())))
    back = unpack_layer(packed, fmt)
    assert _same_bits(back.weight, _expected_weight(cw)), plan
    if cw.mask is None:
        assert back.mask is None
    else:
        assert torch.equal(back.mask, cw.mask), plan
    if cw.quant is None:
        assert back.quant is None
    else:
        q, bq = cw.quant, back.quant
        assert torch.equal(bq.codes, q.codes), plan  # pruned positions hold the zero point in both
        assert _same_bits(bq.scales, q.scales)
        assert (bq.zeros is None) == (q.zeros is None)
        if q.zeros is not None:
            assert torch.equal(bq.zeros, q.zeros)
        assert (bq.bits, bq.group_size) == (q.bits, q.group_size)
        assert _same_bits(bq.weight, q.weight.to(torch.float32))
    # bytes: the size accounting, up to rounding each tensor to whole bytes
    accounted = layer_size(OUT_F, IN_F, plan).bytes
    assert 0 <= tensors_nbytes(packed) - accounted < len(packed), (plan, tensors_nbytes(packed), accounted)
    return packed


RTN_GROUPS = (32, 128, -1, 96)   # 320 inputs: 128 and 96 leave a ragged last group


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", RTN_GROUPS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_rtn_layer_round_trip(bits, group_size, symmetric):
    plan = LayerPlan(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    cw = compress_weight(_weight(bits), plan)
    packed = _check_layer(cw, plan)
    assert set(packed) == {"codes", "scales"} | (set() if symmetric else {"zeros"})
    groups = math.ceil(IN_F / (IN_F if group_size == -1 else group_size))
    assert packed["codes"].numel() == math.ceil(OUT_F * IN_F * bits / 8)
    assert tuple(packed["scales"].shape) == (OUT_F, groups)


def test_dense_layer_round_trip():
    w = _weight(1)
    cw = compress_weight(w, LayerPlan())
    packed = _check_layer(cw, LayerPlan())
    assert set(packed) == {"dense"} and packed["dense"].dtype == torch.bfloat16
    assert tensors_nbytes(packed) == OUT_F * IN_F * 2


LAYER_CASES = [
    LayerPlan(method="magnitude", sparsity=0.5),
    LayerPlan(method="magnitude", sparsity=0.37),
    LayerPlan(method="magnitude", pattern="2:4"),
    LayerPlan(method="magnitude", pattern="4:8"),
    LayerPlan(method="magnitude", pattern="1:4"),
    LayerPlan(method="wanda", sparsity=0.5),
    LayerPlan(method="wanda+rtn", sparsity=0.5, bits=4, group_size=128),
    LayerPlan(method="wanda+rtn", pattern="2:4", bits=3, group_size=32, symmetric=True),
    LayerPlan(method="magnitude+rtn", pattern="4:8", bits=6, group_size=-1),
    LayerPlan(method="gptq", bits=4, group_size=128),
    LayerPlan(method="gptq", bits=3, group_size=32, options={"act_order": True}),
    LayerPlan(method="gptq", bits=4, group_size=-1, symmetric=True, options={"act_order": True}),
    LayerPlan(method="wanda+gptq", sparsity=0.5, bits=4, group_size=64),
    LayerPlan(method="sparsegpt+gptq", sparsity=0.5, bits=4, group_size=128),
    LayerPlan(method="sparsegpt+gptq", pattern="2:4", bits=3, group_size=32, symmetric=True),
    LayerPlan(method="sparsegpt+rtn", pattern="4:8", bits=8, group_size=96),
    LayerPlan(method="sparsegpt", sparsity=0.5),
]


@pytest.mark.parametrize("plan", LAYER_CASES, ids=lambda p: f"{p.method}-{p.pattern}-{p.sparsity}-{p.bits}-{p.group_size}")
def test_pruned_and_calibrated_layer_round_trip(plan):
    cw = compress_weight(_weight(7), plan, _stats())
    packed = _check_layer(cw, plan)
    kept = int(cw.mask.sum()) if cw.mask is not None else OUT_F * IN_F
    if plan.nm is not None:
        n, m = plan.nm
        assert "mask" not in packed
        assert packed["nm_index"].numel() == math.ceil(kept * math.ceil(math.log2(m)) / 8)
    elif plan.pruner is not None:
        assert packed["mask"].numel() == math.ceil(OUT_F * IN_F / 8)
    if plan.quantizer is not None:
        assert packed["codes"].numel() == math.ceil(kept * plan.bits / 8)
    else:
        assert packed["values"].numel() == kept and packed["values"].dtype == torch.bfloat16


def test_float_values_round_through_storage_dtype():
    # sparse float values are stored in the storage dtype: float32 storage keeps them exactly,
    # bfloat16 storage rounds them (so the test above does compare something)
    plan = LayerPlan(method="magnitude", sparsity=0.5)
    cw = compress_weight(_weight(2), plan)
    exact = unpack_layer(pack_layer(cw, plan, torch.float32), LayerFormat.from_plan(plan, OUT_F, IN_F, torch.float32))
    assert _same_bits(exact.weight, cw.weight)
    rounded = unpack_layer(pack_layer(cw, plan), LayerFormat.from_plan(plan, OUT_F, IN_F))
    assert not torch.equal(rounded.weight, cw.weight)
    assert torch.allclose(rounded.weight, cw.weight, rtol=2 ** -8, atol=0)


def test_unpack_into_other_dtypes():
    # a bf16 model's quantized layer comes back bit-identical when unpacked as bf16
    w = _weight(4).to(torch.bfloat16)
    plan = LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4, group_size=32)
    cw = compress_weight(w, plan)
    assert cw.weight.dtype == torch.bfloat16
    back = unpack_layer(pack_layer(cw, plan), LayerFormat.from_plan(plan, OUT_F, IN_F), torch.bfloat16)
    assert _same_bits(back.weight, cw.weight)


@pytest.mark.parametrize("quantized", [False, True])
def test_nm_group_with_fewer_kept_still_exact(quantized):
    # a 2:4 layer in which some groups keep only one weight (e.g. pruned afterwards): padded with a
    # pruned position of value zero; the weight is exact, the mask gains exactly the padded positions
    plan = LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4, group_size=32) if quantized else \
        LayerPlan(method="magnitude", pattern="2:4")
    cw = compress_weight(_weight(5), plan)
    mask = cw.mask.clone()
    dropped = [(0, 0), (3, 17), (23, 319)]
    for r, c in dropped:
        block = mask[r, c - c % 4:c - c % 4 + 4]
        c = c - c % 4 + int(block.nonzero()[0])   # a kept position of that group
        mask[r, c] = False
    weight = torch.where(mask, cw.weight, torch.zeros(()))
    quant = None
    if quantized:
        q = cw.quant
        zero_full = q.zeros[:, torch.arange(IN_F) // q.group_size]
        codes = torch.where(mask, q.codes, zero_full)
        quant = QuantizedWeight(weight.clone(), codes, q.scales, q.zeros, q.bits, q.group_size)
    thinner = CompressedWeight(weight, mask, quant)
    packed = pack_layer(thinner, plan)
    back = unpack_layer(packed, LayerFormat.from_plan(plan, OUT_F, IN_F))
    assert _same_bits(back.weight, _expected_weight(thinner))
    assert int(back.mask.sum()) == int(mask.sum()) + len(dropped) == OUT_F * IN_F // 2
    assert bool((back.mask | ~mask).all())                      # every kept weight is still kept
    assert bool((back.weight[back.mask & ~mask] == 0).all())
    assert tensors_nbytes(packed) == tensors_nbytes(pack_layer(cw, plan))


def test_pack_refuses_mismatched_layers():
    w = _weight(6)
    cw = compress_weight(w, LayerPlan(method="rtn", bits=4, group_size=32))
    with pytest.raises(PlanError, match="does not match its layer plan"):
        pack_layer(cw, LayerPlan(method="rtn", bits=8, group_size=32))
    with pytest.raises(PlanError, match="does not match its layer plan"):
        pack_layer(cw, LayerPlan(method="rtn", bits=4, group_size=64))
    with pytest.raises(PlanError, match="does not match its layer plan"):
        pack_layer(cw, LayerPlan(method="magnitude+rtn", sparsity=0.5, bits=4, group_size=32))
    # an unstructured 50% mask is (almost surely) not 2:4
    unstructured = compress_weight(w, LayerPlan(method="magnitude", sparsity=0.5))
    with pytest.raises(PlanError, match="not 2:4"):
        pack_layer(unstructured, LayerPlan(method="magnitude", pattern="2:4"))


def test_unpack_refuses_corrupt_layers():
    plan = LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4, group_size=32)
    cw = compress_weight(_weight(8), plan)
    fmt = LayerFormat.from_plan(plan, OUT_F, IN_F)
    packed = pack_layer(cw, plan)
    with pytest.raises(PackedFormatError, match="'codes'"):
        unpack_layer({**packed, "codes": packed["codes"][:-1]}, fmt)
    with pytest.raises(PackedFormatError, match="'zeros' is missing"):
        unpack_layer({k: v for k, v in packed.items() if k != "zeros"}, fmt)
    with pytest.raises(PackedFormatError, match="'scales'"):
        unpack_layer({**packed, "scales": packed["scales"].float()}, fmt)
    with pytest.raises(PackedFormatError, match="repeat"):
        unpack_layer({**packed, "nm_index": torch.zeros_like(packed["nm_index"])}, fmt)
    with pytest.raises(PackedFormatError, match="malformed"):
        LayerFormat.from_dict({**fmt.to_dict(), "bits": 11})
    with pytest.raises(PackedFormatError, match="malformed"):
        LayerFormat.from_dict({**fmt.to_dict(), "sparse": "5:4"})


# ---------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------

MENU = [
    LayerPlan(method="rtn", bits=4, group_size=32),
    LayerPlan(method="magnitude", sparsity=0.5),
    LayerPlan(method="wanda+rtn", pattern="2:4", bits=3, group_size=32, symmetric=True),
    LayerPlan(),
    LayerPlan(method="magnitude+rtn", pattern="4:8", bits=8, group_size=-1),
    LayerPlan(method="gptq", bits=4, group_size=32, options={"act_order": True}),
    LayerPlan(method="rtn", bits=5, group_size=48, symmetric=True),      # ragged on 64 inputs
    LayerPlan(method="sparsegpt+gptq", sparsity=0.5, bits=4, group_size=64),
    LayerPlan(method="wanda", pattern="2:4"),
]


OUTSIDE = {"embed": LayerPlan(method="rtn", bits=6, group_size=32, symmetric=True),
           "lm_head": LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4, group_size=64)}


def _mixed_plan(targets) -> dict[str, LayerPlan]:
    return cycle_plan(targets, MENU, lambda t: OUTSIDE.get(t.role))


def _compress(model, targets, plan, stats) -> dict[str, CompressedWeight]:
    return {t.name: compress_weight(read_weight(get_module(model, t.name)), plan[t.name], stats.get(t.name))
            for t in targets if not plan[t.name].is_dense}


def _simulated(model, targets, plan, compressed, round_dtype=None):
    """The in-memory compressed model; with ``round_dtype``, every parameter but the quantized target
    weights rounded through it (what the packed file stores)."""
    sim = copy.deepcopy(model)
    for name, cw in compressed.items():
        write_weight(get_module(sim, name), cw.weight)
    if round_dtype is not None:
        quantized = {id(get_module(sim, t.name).weight) for t in targets if plan[t.name].quantizer is not None}
        with torch.no_grad():
            for p in sim.parameters():
                if id(p) not in quantized:
                    p.copy_(p.to(round_dtype).to(p.dtype))
    return sim


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_whole_model_round_trip(tiny_models, tmp_path, arch):
    lm = load_model(str(tiny_models[arch]))
    model = lm.model
    targets = find_targets(model)
    plan = _mixed_plan(targets)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, len(lm.tokenizer), (2, 32), generator=g)
    stats = collect_input_stats(model, targets, windows, hessian=True)
    compressed = _compress(model, targets, plan, stats)
    kinds = {t.kind for t in targets}
    assert kinds >= ({"conv1d", "embedding"} if arch == "gpt2" else {"linear", "embedding"})

    info = save_packed(tmp_path, model, targets, compressed, plan)
    loaded, back, plans = load_packed(tmp_path)

    assert not loaded.training
    assert plans == plan
    assert set(back) == {t.name for t in targets}
    for t in targets:
        if plan[t.name].quantizer is not None:
            assert _same_bits(back[t.name].weight, compressed[t.name].weight), t.name
        assert info.layer_bytes[t.name] - info.layer_accounted[t.name] in range(0, 5), t.name
        assert _same_bits(read_weight(get_module(loaded, t.name)), back[t.name].weight), t.name
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert (emb.weight is head.weight) == (arch != "llama")

    ids = torch.randint(3, len(lm.tokenizer), (2, 24), generator=g)
    got = _logits(loaded, ids)
    rounded = _logits(_simulated(model, targets, plan, compressed, torch.bfloat16), ids)
    unrounded = _logits(_simulated(model, targets, plan, compressed), ids)
    dense = _logits(model, ids)
    scale = float(dense.abs().max())
    diff_rounded = float((got - rounded).abs().max())
    diff_unrounded = float((got - unrounded).abs().max())
    diff_dense = float((got - dense).abs().max())
    print(f"{arch}: max |logits| {scale:.3g}; packed vs simulated+bf16 {diff_rounded:.2e}, "
          f"vs simulated {diff_unrounded:.2e}, vs dense {diff_dense:.2e}; "
          f"{info.bytes_on_disk} bytes on disk, {info.accounted_bytes} accounted")
    assert diff_rounded <= 1e-5
    assert diff_unrounded <= 0.02 * scale            # bf16 rounding of the float parameters only
    assert diff_dense > 100 * max(diff_rounded, 1e-6)  # the compression is really there


def _size_model():
    """A Llama large enough (6.7M parameters) that the safetensors header is a negligible part."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=384, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


SIZE_PLANS = {
    "4bit": lambda t, i: LayerPlan(method="rtn", bits=4, group_size=128),
    "2:4+4bit": lambda t, i: (LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4, group_size=128) if t.in_blocks
                              else LayerPlan(method="rtn", bits=4, group_size=128)),
    "mixed": lambda t, i: [LayerPlan(method="rtn", bits=3, group_size=64, symmetric=True),
                           LayerPlan(method="magnitude", sparsity=0.6),
                           LayerPlan(),
                           LayerPlan(method="magnitude+rtn", pattern="4:8", bits=5, group_size=-1),
                           LayerPlan(method="magnitude+rtn", sparsity=0.5, bits=2, group_size=32),
                           LayerPlan(method="rtn", bits=8, group_size=96)][i % 6],
}


@pytest.mark.parametrize("name", list(SIZE_PLANS))
def test_bytes_on_disk_match_accounted_size(tmp_path, name):
    model = _size_model()
    targets = find_targets(model)
    plan = {t.name: SIZE_PLANS[name](t, i) for i, t in enumerate(targets)}
    compressed = _compress(model, targets, plan, {})
    info = save_packed(tmp_path, model, targets, compressed, plan)
    on_disk = (tmp_path / PACKED_FILE).stat().st_size
    accounted = model_size(model, targets, plan).total_bytes
    print(f"{name}: {on_disk} bytes on disk, {accounted} accounted ({on_disk / accounted - 1:+.3%}), "
          f"header {info.header_bytes}, dense {model_size(model, targets, {}).total_bytes}")
    assert (info.bytes_on_disk, info.accounted_bytes) == (on_disk, accounted)
    assert accounted <= on_disk <= 1.02 * accounted
    # everything but the header is the accounted size, up to a byte per tensor
    assert 0 <= on_disk - info.header_bytes - accounted < 6 * len(targets)
    assert sum(info.layer_bytes.values()) + info.other_bytes == on_disk - info.header_bytes


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed_dir(tiny_models, tmp_path_factory):
    lm = load_model(str(tiny_models["gemma3"]))
    targets = find_targets(lm.model)
    plan = {t.name: LayerPlan(method="rtn", bits=4, group_size=32) for t in targets}
    out = tmp_path_factory.mktemp("packed")
    save_packed(out, lm.model, targets, _compress(lm.model, targets, plan, {}), plan)
    return out


def _copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_metadata(folder, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / PACKED_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, **changes})


def test_packed_file_has_ordinary_permissions(packed_dir):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((packed_dir / PACKED_FILE).stat().st_mode) == 0o666 & ~umask


def test_packed_dir_loads(packed_dir):
    model, compressed, plans = load_packed(packed_dir)
    assert all(p.bits == 4 for p in plans.values()) and len(compressed) == len(plans)


def test_missing_file_or_config(tmp_path, packed_dir):
    with pytest.raises(PackedFormatError, match="does not exist"):
        load_packed(tmp_path)
    folder = _copy_dir(packed_dir, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(PackedFormatError, match="config.json"):
        load_packed(folder)


def test_unknown_version_and_foreign_file(tmp_path, packed_dir):
    folder = _copy_dir(packed_dir, tmp_path / "v2")
    _rewrite_metadata(folder, format_version="2")
    with pytest.raises(PackedFormatError, match="version '2'.*reads version 1"):
        load_packed(folder)
    folder = _copy_dir(packed_dir, tmp_path / "foreign")
    _rewrite_metadata(folder, format="something-else")
    with pytest.raises(PackedFormatError, match="not an autocomp packed model"):
        load_packed(folder)
    folder = _copy_dir(packed_dir, tmp_path / "layout")
    _rewrite_metadata(folder, layout="{not json")
    with pytest.raises(PackedFormatError, match="malformed layout"):
        load_packed(folder)


def test_corrupt_file(tmp_path, packed_dir):
    # a flipped byte in the data: caught by the digest
    folder = _copy_dir(packed_dir, tmp_path / "flipped")
    path = folder / PACKED_FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="corrupt"):
        load_packed(folder)
    # truncated, and garbage
    folder = _copy_dir(packed_dir, tmp_path / "truncated")
    path = folder / PACKED_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(PackedFormatError, match="truncated or corrupt"):
        load_packed(folder)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(PackedFormatError):
        load_packed(folder)
    assert issubclass(PackedFormatError, AutocompError)


# ---------------------------------------------------------------------------------------------
# where compressed weights come from: the stitcher and its variant cache
# ---------------------------------------------------------------------------------------------


def test_stitcher_gives_the_codes_of_what_it_stitched(tiny_models, tmp_path):
    """``compressed_weights`` returns, for every compressed layer, codes that reproduce the weight
    the model holds: computed (data-free), and read back from the disk tier (calibrated)."""
    from autocomp.pipeline.variants import LayerVariantCache
    from autocomp.pipeline.calibration import stats_digest
    from autocomp.inputs.data import WindowSpec, text_windows
    from autocomp.pipeline.stitch import ModelStitcher

    lm = load_model(str(tiny_models["llama"]))
    targets = find_targets(lm.model)
    ids = text_windows(lm.tokenizer, "wikitext2", "validation", WindowSpec(2, 32), random=True).input_ids
    stats = collect_input_stats(lm.model, targets, ids, hessian=True)
    plans = {targets[0].name: LayerPlan(method="rtn", bits=4, group_size=32),
             targets[1].name: LayerPlan(method="wanda+gptq", pattern="2:4", bits=3, group_size=32),
             targets[2].name: LayerPlan(method="magnitude", sparsity=0.5)}
    for attempt in ("computed", "from disk"):
        cache = LayerVariantCache(directory=tmp_path / "variants")
        stitcher = ModelStitcher(lm.model, targets, lm.fingerprint, stats, stats_digest(ids, lm.fingerprint), cache)
        stitcher.apply(plans)
        got = stitcher.compressed_weights()
        assert set(got) == set(plans), attempt
        for name, cw in got.items():
            held = read_weight(get_module(lm.model, name))
            assert torch.equal(cw.weight, held), (attempt, name)
            if cw.quant is not None:
                assert cw.quant.bits == plans[name].bits
                packed = pack_layer(cw, plans[name], torch.float16)
                fmt = LayerFormat.from_plan(plans[name], *held.shape, torch.float16)
                assert torch.equal(unpack_layer(packed, fmt).weight, held), (attempt, name)
        stitcher.apply({})
    assert cache.disk_hits == 1 and len(cache.disk_entries()) == 1  # only the calibrated variant is stored
