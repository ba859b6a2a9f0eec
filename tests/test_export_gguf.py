"""The GGUF export: the blocks written from the codes dequantize (gguf-py) to the simulated weights
bit for bit; read back, the model computes exactly what the float export computes, and transformers'
own GGUF reader (an independent implementation of llama.cpp's names, permutations and norm offsets)
agrees; what GGUF cannot hold is refused by name; llama.cpp runs the file when llama-cpp-python is
installed."""

from __future__ import annotations

import json

import pytest
import torch

import autocomp
from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan
from autocomp.errors import PlanError
from autocomp.exporters import get_format
from autocomp.exporters.gguf_file import GGUF_FILE, ggml_type, pack_blocks

CALIB = CalibrationSpec("wikitext2", "validation", 2, 32, 0)


def _rtn(bits, group=32, symmetric=True, **kw):
    return LayerPlan(method=kw.pop("method", "rtn"), bits=bits, group_size=group, symmetric=symmetric, **kw)


# every block type: Q4_0 (2-4 bits symmetric, 3 asymmetric), Q5_0 (4 asymmetric, 5 symmetric),
# Q8_0 (6 asymmetric, 8 symmetric); groups 32 / 64 / per channel; 2:4 and unstructured sparsity
BLOCK_LAYERS = {
    "llama": ("\\.0\\.self_attn\\.q_proj", "\\.0\\.self_attn\\.k_proj", "\\.0\\.self_attn\\.v_proj",
              "\\.0\\.self_attn\\.o_proj", "\\.0\\.mlp\\.down_proj", "\\.1\\.self_attn\\.(q|k)_proj", "embed_tokens"),
    "gpt2": ("\\.0\\.attn\\.c_attn", "\\.0\\.mlp\\.c_fc", "\\.0\\.attn\\.c_proj", "\\.1\\.attn\\.c_proj",
             "\\.0\\.mlp\\.c_proj", "\\.1\\.attn\\.c_attn", "wte"),
}
BLOCK_LAYERS["gemma3"] = BLOCK_LAYERS["qwen2"] = BLOCK_LAYERS["llama"]
CHOICES = (_rtn(2, 64), _rtn(3, 32, symmetric=False), _rtn(5, -1), _rtn(6, 32, symmetric=False),
           _rtn(4, 32, method="magnitude+rtn", pattern="2:4"), LayerPlan(method="wanda", sparsity=0.5), _rtn(8, 64))


def _plan(arch: str) -> CompressionPlan:
    return CompressionPlan(embeddings=True, default=_rtn(4, 32, symmetric=False), calibration=CALIB,
                           layers=tuple((f"re:{key}", lp) for key, lp in zip(BLOCK_LAYERS[arch], CHOICES)))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("bits, symmetric, expected", [
    (2, True, "Q4_0"), (3, True, "Q4_0"), (4, True, "Q4_0"), (2, False, "Q4_0"), (3, False, "Q4_0"),
    (5, True, "Q5_0"), (4, False, "Q5_0"), (6, True, "Q8_0"), (8, True, "Q8_0"), (5, False, "Q8_0"),
    (6, False, "Q8_0"), (8, False, None)])
def test_each_bit_width_takes_the_smallest_exact_block_type(bits, symmetric, expected):
    assert ggml_type(bits, symmetric) == expected


@pytest.mark.parametrize("type_name, low, high", [("Q4_0", -8, 7), ("Q5_0", -16, 15), ("Q8_0", -128, 127)])
def test_blocks_dequantize_with_gguf_py_to_the_integers_times_the_scales(type_name, low, high):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    gen = torch.Generator().manual_seed(0)
    signed = torch.randint(low, high + 1, (6, 96), generator=gen)
    signed[0, :2] = torch.tensor([low, high])
    scales = (torch.rand(6, 3, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    raw = pack_blocks(signed, scales, type_name).numpy()
    got = torch.from_numpy(dequantize(raw, getattr(GGMLQuantizationType, type_name)).copy())
    want = signed.float() * scales.float().repeat_interleave(32, dim=1)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    out = {}
    for arch in ("llama", "gemma3", "qwen2", "gpt2"):
        root = tmp_path_factory.mktemp(f"gguf-{arch}")
        model = str(tiny_models[arch])
        out[arch] = (autocomp.compress(model, _plan(arch), root / "gguf", format="gguf", dtype="float32"),
                     autocomp.compress(model, _plan(arch), root / "float", format="float"))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "gpt2"])
def test_the_file_read_back_computes_the_float_export_exactly(arch, exports):
    from transformers import AutoModelForCausalLM

    gguf_dir, flt = exports[arch]
    ref = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float32).eval()
    ours = get_format("gguf").load(gguf_dir)
    ids = torch.randint(3, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))
    info = json.loads((gguf_dir / "autocomp.json").read_text())
    assert {"Q4_0", "Q5_0", "Q8_0"} <= set(info["gguf_tensor_types"])
    assert info["sparse_layers_stored_dense"]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_transformers_gguf_reader_agrees(arch, exports):
    """transformers reads names, the q/k permutation and Gemma's ``1 + w`` norms its own way (it cannot
    read the GPT-2 file back: it takes GPT-2's context length as n_ctx, not n_positions)."""
    from transformers import AutoModelForCausalLM

    gguf_dir, flt = exports[arch]
    ref = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(theirs, ids), _logits(ref, ids))


def test_float16_storage_rounds_only_the_float_tensors(tiny_models, tmp_path):
    import gguf

    plan = CompressionPlan(default=_rtn(4, 32), calibration=CALIB)
    out = autocomp.compress(str(tiny_models["llama"]), plan, tmp_path / "g", format="gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / GGUF_FILE)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("layer, why", [
    (_rtn(8, 32, symmetric=False), "asymmetric 8-bit"),
    (_rtn(4, 16), "multiples of 32"),
])
def test_what_gguf_cannot_hold_is_refused_before_writing(tiny_models, tmp_path, layer, why):
    plan = CompressionPlan(default=layer, calibration=CALIB)
    with pytest.raises(PlanError, match=why) as err:
        autocomp.compress(str(tiny_models["llama"]), plan, tmp_path / "out", format="gguf")
    assert "model.layers.0." in str(err.value)
    assert not list(tmp_path.iterdir())


def test_an_architecture_without_a_gguf_writer_is_refused(tiny_models, tmp_path):
    plan = CompressionPlan(default=_rtn(4, 32), calibration=CALIB)
    with pytest.raises(PlanError, match="'opt' has no GGUF writer"):
        autocomp.compress(str(tiny_models["opt"]), plan, tmp_path / "out", format="gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "gpt2"])
def test_llama_cpp_runs_the_file_close_to_the_trial(arch, exports):
    """llama.cpp quantizes activations in its matmuls: perplexity within 2% of the float export's.
    Skipped without llama-cpp-python (a 10-15 minute source build), unless AUTOCOMP_REQUIRE_LLAMA_CPP=1 (CI)."""
    from optional_deps import llama_cpp_or_skip

    llama_cpp_or_skip()
    import llama_cpp
    import numpy as np
    from transformers import AutoModelForCausalLM

    gguf_dir, flt = exports[arch]
    ref = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(gguf_dir / GGUF_FILE), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=1)
    ids = torch.randint(3, ref.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:64], dtype=np.float32))
    ours = _logits(ref, ids)[0]

    def ppl(logits):
        return float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).exp())

    assert ppl(theirs) == pytest.approx(ppl(ours), rel=0.02)
