"""The compressed-tensors export: plain ``from_pretrained`` loads it and computes exactly what the
float export (the simulated weights in float32) computes, for mixed bits, groups, symmetric and
asymmetric layers and pruned layers; layers it cannot hold are stored dequantized and named; what
vLLM cannot serve is refused (``--target vllm``) before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

import autocomp
from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan
from autocomp.errors import PlanError

CALIB = CalibrationSpec("wikitext2", "validation", 2, 32, 0)


def _rtn(bits, group=32, symmetric=True, **kw):
    return LayerPlan(method=kw.pop("method", "rtn"), bits=bits, group_size=group, symmetric=symmetric, **kw)


# every bit width autocomp has (2..6, 8), groups 32 / 64 / per channel (64 = the input size of the attention layers), symmetric and asymmetric, 2:4 and unstructured
# sparsity under quantization, a pruned layer left in 16 bits, a calibrated method, a quantized embedding
MIXED = CompressionPlan(
    embeddings=True,
    default=_rtn(4, 32, symmetric=False),
    layers=(("re:\\.0\\.self_attn\\.q_proj", _rtn(2, 64)),
            ("re:\\.0\\.self_attn\\.k_proj", _rtn(3, 32, symmetric=False)),
            ("re:\\.0\\.self_attn\\.v_proj", _rtn(5, -1)),
            ("re:\\.0\\.self_attn\\.o_proj", _rtn(6, 32, symmetric=False)),
            ("re:\\.0\\.mlp\\.gate_proj", _rtn(6, 64)),
            ("re:\\.0\\.mlp\\.up_proj", _rtn(8, -1)),
            ("re:\\.0\\.mlp\\.down_proj", _rtn(4, 32, method="magnitude+rtn", pattern="2:4")),
            ("re:\\.1\\.self_attn\\.(q|k)_proj", LayerPlan(method="wanda", sparsity=0.5)),
            ("re:\\.1\\.mlp\\.up_proj", _rtn(3, 32, method="wanda+gptq", sparsity=0.3)),
            ("re:\\.1\\.mlp\\.down_proj", _rtn(8, 64)),
            ("re:embed_tokens", _rtn(8, 64))),
    calibration=CALIB)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    """``{arch: (compressed-tensors folder in float32, float folder)}`` of MIXED."""
    out = {}
    for arch in ("llama", "gemma3", "qwen2"):
        root = tmp_path_factory.mktemp(f"ct-{arch}")
        model = str(tiny_models[arch])
        out[arch] = (autocomp.compress(model, MIXED, root / "ct", format="compressed-tensors", dtype="float32"),
                     autocomp.compress(model, MIXED, root / "float", format="float"))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_from_pretrained_computes_the_float_export_exactly(arch, exports):
    from transformers import AutoModelForCausalLM

    ct, flt = exports[arch]
    ours = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float32).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1, :8], **gen), ref.generate(ids[:1, :8], **gen))


def test_the_file_holds_the_codes_in_one_config_group_per_scheme(exports):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    ct, _ = exports["llama"]
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    groups = config["config_groups"].values()
    schemes = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"]) for g in groups}
    # asymmetric b-bit layers are stored as symmetric (b+1)-bit: 4a->5, 3a->4, 6a->7
    assert schemes == {(2, "channel", None), (4, "group", 32), (5, "channel", None), (7, "group", 32),
                       (6, "channel", None), (8, "channel", None), (8, "group", 64), (5, "group", 32), (3, "group", 32)}
    assert all(g["weights"]["symmetric"] for g in groups)
    targets = [n for g in groups for n in g["targets"]]
    assert len(targets) == len(set(targets)) and "model.layers.0.self_attn.q_proj" in targets
    assert not any("embed" in n for n in targets), "the embedding is stored dequantized"
    assert "embedding" in json.loads((ct / "autocomp.json").read_text())["stored_dequantized"]["model.embed_tokens"]["reason"]
    tensors = load_file(ct / "model.safetensors")
    info = json.loads((ct / "autocomp.json").read_text())
    assert "model.embed_tokens" in info["stored_dequantized"] and "more than accounted" in info["note"]
    assert info["sparse_layers_stored_dense"]["model.layers.0.mlp.down_proj"] == "2:4"
    # 2-bit codes of q_proj: every stored integer in [-2, 1], the shape recorded
    name = "model.layers.0.self_attn.q_proj"
    shape = tensors[f"{name}.weight_shape"]
    q = unpack_from_int32(tensors[f"{name}.weight_packed"], 2, torch.Size(shape.tolist()))
    assert q.shape == (64, 64) and int(q.min()) >= -2 and int(q.max()) <= 1 and len(q.unique()) > 2
    assert tensors[f"{name}.weight_scale"].shape == (64, 1)   # per channel


def test_float16_export_is_the_float_export_rounded_to_float16(tiny_models, tmp_path):
    """fp16 scales are exact in a float16 model: each dequantized weight is the float32 product rounded
    once, as the float export cast to float16 is."""
    from transformers import AutoModelForCausalLM

    model = str(tiny_models["llama"])
    plan = CompressionPlan(default=_rtn(4, 32, symmetric=False), calibration=CALIB)
    ct = autocomp.compress(model, plan, tmp_path / "ct", format="compressed-tensors")
    flt = autocomp.compress(model, plan, tmp_path / "float", format="float")
    assert json.loads((ct / "config.json").read_text())["dtype"] == "float16"
    ours = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float16).eval()
    ref = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float16).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))
    info = json.loads((ct / "autocomp.json").read_text())
    assert "scale_rounding_max_rel" not in info
    assert info["bytes_on_disk"] < sum(p.numel() * 2 for p in ref.parameters()), "smaller than the fp16 model"


def test_bfloat16_export_states_the_scale_rounding(tiny_models, tmp_path):
    plan = CompressionPlan(default=_rtn(4, 32), calibration=CALIB)
    ct = autocomp.compress(str(tiny_models["llama"]), plan, tmp_path / "ct", format="compressed-tensors",
                           dtype="bfloat16")
    info = json.loads((ct / "autocomp.json").read_text())
    assert 0 < info["scale_rounding_max_rel"] <= 2 ** -8 and "rounded to bfloat16" in info["note"]


@pytest.mark.parametrize("arch, layer, why", [
    ("gpt2", _rtn(4, 32), "Conv1D"),
    ("llama", _rtn(8, 32, symmetric=False), "asymmetric 8-bit"),
    ("llama", _rtn(4, 48), "group size 48 does not divide"),
])
def test_what_compressed_tensors_cannot_hold_is_stored_dequantized_and_stated(tiny_models, tmp_path, arch, layer, why):
    """The folder still loads and computes the trial's model; autocomp.json names each such layer."""
    from transformers import AutoModelForCausalLM

    plan = CompressionPlan(default=layer, calibration=CALIB)
    model = str(tiny_models[arch])
    ct = autocomp.compress(model, plan, tmp_path / "ct", format="compressed-tensors", dtype="float32")
    flt = autocomp.compress(model, plan, tmp_path / "float", format="float")
    info = json.loads((ct / "autocomp.json").read_text())
    assert info["stored_dequantized"] and all(why in d["reason"] and d["bytes_added"] > 0
                                              for d in info["stored_dequantized"].values())
    assert "stored dequantized" in info["note"]
    ours = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.float32).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_logits(ours, ids), _logits(ref, ids))


@pytest.mark.parametrize("layers, why", [
    ((("re:.*", _rtn(3, 32)),), "unpacks differently"),
    ((("re:.*", _rtn(4, 32, symmetric=False)),), "asymmetric 4-bit"),
    ((("re:.*", _rtn(4, 32)), ("re:\\.0\\.self_attn\\.k_proj", _rtn(8, 32))), "block 0 fuses q/k/v"),
    ((("re:.*", _rtn(4, 32)), ("re:\\.1\\.mlp\\.up_proj", LayerPlan())), "block 1 fuses gate/up"),
])
def test_the_vllm_target_refuses_what_vllm_cannot_serve(tiny_models, tmp_path, layers, why):
    plan = CompressionPlan(layers=layers, calibration=CALIB)
    with pytest.raises(PlanError, match=why):
        autocomp.compress(str(tiny_models["llama"]), plan, tmp_path / "out", target="vllm")
    assert not (tmp_path / "out").exists()


def test_the_vllm_target_accepts_what_vllm_serves(tiny_models, tmp_path):
    plan = CompressionPlan(layers=(("re:self_attn", _rtn(4, 32)), ("re:mlp", _rtn(3, 64, symmetric=False))),
                           calibration=CALIB)
    out = autocomp.compress(str(tiny_models["llama"]), plan, tmp_path / "out", target="vllm")
    info = json.loads((out / "autocomp.json").read_text())
    assert info["format"] == "compressed-tensors" and info["target"] == "vllm"


def test_a_target_the_format_does_not_check_is_refused(tiny_models, tmp_path):
    plan = CompressionPlan(default=_rtn(4, 32), calibration=CALIB)
    with pytest.raises(PlanError, match="--target vllm is not checked by --format packed"):
        autocomp.compress(str(tiny_models["llama"]), plan, tmp_path / "out", format="packed", target="vllm")
