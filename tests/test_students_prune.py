"""Structured pruning into a real, smaller Hugging Face model (autocomp.students.prune).

The index-mapping tests plant an answer in a copy of the teacher (zeroed neurons, heads, an identity
block) that removes nothing from its function, then check that exactly those indices are pruned and
that the student computes the same logits: they fail when an importance score or a slice is wrong.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import ARCHS, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from autocomp.inputs.data import load_named_split, tokenize
from autocomp.errors import PlanError
from autocomp.students.arch import family_of_model
from autocomp.students.prune import (
    layer_importance,
    prune_student,
    resolve_student,
    student_config,
    teacher_dims,
    width_importance,
)
from autocomp.students.spec import StudentSpec
from autocomp.inputs.targets import read_weight


@pytest.fixture(scope="module")
def calib(tiny_models) -> torch.Tensor:
    """[4, 32] token ids of WikiText-2 validation text, from the tiny tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    ids = tokenize(tok, load_named_split("wikitext2", "validation").text[:4000])
    return ids[:128].reshape(4, 32)


def _load(tiny_models, arch: str):
    return AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _block(model, index: int):
    return family_of_model(model)[2][index]


def _weight(model, block: int, path: str) -> torch.Tensor:
    return read_weight(_block(model, block).get_submodule(path))   # [out, in], Conv1D transposed


def _without(t: torch.Tensor, drop: list[int], dim: int) -> torch.Tensor:
    keep = [i for i in range(t.shape[dim]) if i not in set(drop)]
    return t.index_select(dim, torch.tensor(keep))


def _head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


# ---------------------------------------------------------------- a real, smaller model

CASES = [
    ("llama", {"layers": 1, "ffn": 96, "heads": 2, "kv_heads": 1}),
    ("llama", {"layers": 1, "ffn": 96, "heads": 2, "kv_heads": 2, "depth_importance": "loss", "width_importance": "magnitude"}),
    ("gemma3", {"layers": 1, "ffn": 96, "heads": 2, "kv_heads": 1}),
    ("qwen2", {"layers": 1, "ffn": 96, "heads": 2, "kv_heads": 1, "depth_importance": "tail"}),
    ("gpt2", {"layers": 1, "ffn": 192}),
    ("opt", {"layers": 1, "ffn": 96, "width_importance": "magnitude"}),
]


@pytest.mark.parametrize("arch,sizes", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_pruned_student_is_a_real_smaller_model(tiny_models, calib, tmp_path, arch, sizes):
    teacher = _load(tiny_models, arch).train()            # train mode: pruning must restore it
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = StudentSpec(**sizes)
    student = prune_student(teacher, spec, calib)

    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert teacher.training and all(m.training for m in teacher.modules())

    t_dims = teacher_dims(teacher.config)
    dims = teacher_dims(student.model.config)
    heads = sizes.get("heads", t_dims["heads"])
    assert dims == {"layers": sizes["layers"], "ffn": sizes["ffn"], "heads": heads,
                    "kv_heads": sizes.get("kv_heads", t_dims["kv_heads"]), "head_dim": t_dims["head_dim"],
                    "hidden": t_dims["hidden"]}
    assert student.spec.distill == spec.distill
    assert (student.spec.layers, student.spec.ffn, student.spec.heads) == (sizes["layers"], sizes["ffn"], heads)
    assert len(student.kept_layers) == sizes["layers"] and len(student.layer_scores) == t_dims["layers"]
    model = student.model
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())

    fresh = AutoModelForCausalLM.from_config(model.config)
    assert _params(model) == _params(fresh) < _params(teacher)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == \
        bool(teacher.config.tie_word_embeddings)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded, calib), _logits(model, calib))

    out = model.generate(calib[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert 8 < out.shape[1] <= 12

    again = prune_student(teacher, spec, calib)          # deterministic
    assert again.kept_layers == student.kept_layers
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_spec_reproduces_the_teacher(tiny_models, calib, arch):
    teacher = _load(tiny_models, arch)
    student = prune_student(teacher, StudentSpec())      # nothing pruned: no calibration needed
    assert student.kept_layers == (0, 1) and student.layer_scores == ()
    torch.testing.assert_close(_logits(student.model, calib), _logits(teacher, calib), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the right indices are pruned


@pytest.mark.parametrize("method", ["activation", "magnitude"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zeroed_ffn_neurons_are_the_ones_pruned(tiny_models, calib, arch, method):
    teacher = _load(tiny_models, arch)
    family = family_of_model(teacher)[0]
    ffn = teacher_dims(teacher.config)["ffn"]
    dead = {0: [3, 17, 40, 101], 1: [0, 64, 65, ffn - 1]}  # different neurons per block
    with torch.no_grad():
        for b, idx in dead.items():
            block = _block(teacher, b)
            if method == "activation":   # the neuron's activation is 0: zero its up (fc1 / c_fc) rows and bias
                up = block.get_submodule(family.up)
                read_weight(up)[idx] = 0
                if up.bias is not None:
                    up.bias[idx] = 0
            else:                        # its output weights are 0: zero its down (fc2 / c_proj) column
                read_weight(block.get_submodule(family.down))[:, idx] = 0
    scores = width_importance(teacher, calib, method, heads=False)
    for b, idx in dead.items():
        assert (scores[b][0][idx] == 0).all() and (_without(scores[b][0], idx, 0) > 0).all()
    student = prune_student(teacher, StudentSpec(ffn=ffn - 4, width_importance=method), calib)
    for b, idx in dead.items():
        for path in (family.up, family.gate):
            if path:
                assert torch.equal(_weight(student.model, b, path), _without(_weight(teacher, b, path), idx, 0))
        assert torch.equal(_weight(student.model, b, family.down), _without(_weight(teacher, b, family.down), idx, 1))
    torch.testing.assert_close(_logits(student.model, calib), _logits(teacher, calib), atol=1e-5, rtol=0)


# arch, dead heads (their o_proj columns zeroed), student heads / kv heads, kept heads
HEAD_CASES = [("gemma3", [1, 2], 2, 1, [0, 3]), ("llama", [1, 2], 2, 2, [0, 3]), ("qwen2", [0, 3], 2, 2, [1, 2])]


@pytest.mark.parametrize("arch,dead,heads,kv,kept", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_zeroed_query_heads_are_the_ones_pruned(tiny_models, calib, arch, dead, heads, kv, kept):
    teacher = _load(tiny_models, arch)
    family = family_of_model(teacher)[0]
    hd = teacher_dims(teacher.config)["head_dim"]
    with torch.no_grad():
        for b in (0, 1):
            read_weight(_block(teacher, b).get_submodule(family.o))[:, _head_rows(dead, hd)] = 0
    student = prune_student(teacher, StudentSpec(heads=heads, kv_heads=kv, width_importance="magnitude"))
    for b in (0, 1):
        assert torch.equal(_weight(student.model, b, family.q), _weight(teacher, b, family.q)[_head_rows(kept, hd)])
        assert torch.equal(_weight(student.model, b, family.o), _weight(teacher, b, family.o)[:, _head_rows(kept, hd)])
        for path in (family.k, family.v):   # every kv group is kept
            assert torch.equal(_weight(student.model, b, path), _weight(teacher, b, path))
    torch.testing.assert_close(_logits(student.model, calib), _logits(teacher, calib), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_silent_kv_group_is_the_one_pruned(tiny_models, calib, arch):
    """A kv group whose values are 0 gives its query heads zero activations: the group and its heads go."""
    teacher = _load(tiny_models, arch)
    family = family_of_model(teacher)[0]
    hd = teacher_dims(teacher.config)["head_dim"]
    silent = {0: 0, 1: 1}                        # block -> kv group whose values are 0 (kv head g serves 2g, 2g+1)
    with torch.no_grad():
        for b, g in silent.items():
            v = _block(teacher, b).get_submodule(family.v)
            v.weight[_head_rows([g], hd)] = 0
            if v.bias is not None:               # Qwen2 has q/k/v biases
                v.bias[_head_rows([g], hd)] = 0
    scores = width_importance(teacher, calib, "activation")
    for b, g in silent.items():
        heads = scores[b][1]
        assert heads[2 * g] == 0 and heads[2 * g + 1] == 0 and (heads[[2 * (1 - g), 2 * (1 - g) + 1]] > 0).all()
    student = prune_student(teacher, StudentSpec(heads=2, kv_heads=1), calib)
    for b, g in silent.items():
        kept_group, kept_heads = 1 - g, [2 * (1 - g), 2 * (1 - g) + 1]
        q = _block(student.model, b).get_submodule(family.q)
        assert torch.equal(q.weight, _weight(teacher, b, family.q)[_head_rows(kept_heads, hd)])
        if q.bias is not None:
            assert torch.equal(q.bias, _block(teacher, b).get_submodule(family.q).bias[_head_rows(kept_heads, hd)])
        assert torch.equal(_weight(student.model, b, family.o), _weight(teacher, b, family.o)[:, _head_rows(kept_heads, hd)])
        for path in (family.k, family.v):
            assert torch.equal(_weight(student.model, b, path), _weight(teacher, b, path)[_head_rows([kept_group], hd)])
    torch.testing.assert_close(_logits(student.model, calib), _logits(teacher, calib), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_block_is_the_one_dropped(tiny_models, calib, arch):
    teacher = _load(tiny_models, arch)
    family = family_of_model(teacher)[0]
    with torch.no_grad():   # block 0 adds nothing to the residual stream
        for path in (family.o, family.down):
            module = _block(teacher, 0).get_submodule(path)
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    scores = layer_importance(teacher, calib, "bi")
    assert scores[0] == pytest.approx(0.0, abs=1e-5) and scores[1] > 1e-3
    student = prune_student(teacher, StudentSpec(layers=1, depth_importance="bi"), calib)
    assert student.kept_layers == (1,)
    torch.testing.assert_close(_logits(student.model, calib), _logits(teacher, calib), atol=1e-5, rtol=0)


def test_tail_keeps_the_first_blocks_and_the_last(tiny_models):
    teacher = _load(tiny_models, "llama")
    scores = layer_importance(teacher, None, "tail")
    assert scores[1] > scores[0]
    cfg = tiny_config("llama", teacher.config.vocab_size)
    cfg.num_hidden_layers = 5
    torch.manual_seed(0)
    deep = AutoModelForCausalLM.from_config(cfg).eval()
    student = prune_student(deep, StudentSpec(layers=3, depth_importance="tail", width_importance="magnitude"))
    assert student.kept_layers == (0, 1, 4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_heads_cannot_change_where_head_dim_is_tied(tiny_models, arch):
    teacher = _load(tiny_models, arch)
    with pytest.raises(PlanError, match="head_dim"):
        prune_student(teacher, StudentSpec(heads=2, width_importance="magnitude"))
    with pytest.raises(PlanError, match="head_dim"):
        resolve_student(teacher.config, StudentSpec(kv_heads=2))
    assert resolve_student(teacher.config, StudentSpec(heads=4)).kv_heads == 4


def test_sizes_beyond_the_teacher_and_bad_groups_are_plan_errors(tiny_models):
    config = _load(tiny_models, "llama").config       # 2 layers, ffn 128, 4 heads, 2 kv heads
    with pytest.raises(PlanError, match=r"layers \(3\).*1\.\.2"):
        resolve_student(config, StudentSpec(layers=3))
    with pytest.raises(PlanError, match="ffn"):
        resolve_student(config, StudentSpec(ffn=129))
    with pytest.raises(PlanError, match="heads"):
        resolve_student(config, StudentSpec(heads=5))
    with pytest.raises(PlanError, match="kv_heads"):
        resolve_student(config, StudentSpec(heads=4, kv_heads=4))
    with pytest.raises(PlanError, match="kv_heads"):    # 1 kv head cannot serve 4 query heads (teacher: 2)
        resolve_student(config, StudentSpec(heads=4, kv_heads=1))
    with pytest.raises(PlanError, match=r"kv_heads to one of \[1\]"):
        resolve_student(config, StudentSpec(heads=1))
    resolved = resolve_student(config, StudentSpec(heads=2))
    assert (resolved.layers, resolved.ffn, resolved.heads, resolved.kv_heads) == (2, 128, 2, 2)
    with pytest.raises(PlanError, match="hidden size 64"):   # transformers' Llama/Gemma3 configs: hidden % heads == 0
        resolve_student(_load(tiny_models, "gemma3").config, StudentSpec(heads=3, kv_heads=1))
    with pytest.raises(PlanError, match="bert"):
        teacher_dims(type("Config", (), {"model_type": "bert"})())


def test_data_driven_importance_needs_calibration_ids(tiny_models):
    teacher = _load(tiny_models, "llama")
    with pytest.raises(PlanError, match="calibration"):
        prune_student(teacher, StudentSpec(layers=1, depth_importance="bi"))
    with pytest.raises(PlanError, match="calibration"):
        prune_student(teacher, StudentSpec(ffn=64, width_importance="activation"))
    with pytest.raises(PlanError, match="calibration"):
        layer_importance(teacher, None, "loss")
    student = prune_student(teacher, StudentSpec(layers=1, ffn=64, depth_importance="tail", width_importance="magnitude"))
    assert student.kept_layers == (1,)


# ---------------------------------------------------------------- per-layer config


def test_gemma3_student_keeps_the_kept_layers_types(tiny_models, calib, tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    cfg = tiny_config("gemma3", _load(tiny_models, "gemma3").config.vocab_size)
    cfg.num_hidden_layers = 4
    cfg.layer_types = types
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg).eval()
    tail = prune_student(teacher, StudentSpec(layers=2, depth_importance="tail", width_importance="magnitude"))
    assert tail.kept_layers == (0, 3)
    assert tail.model.config.layer_types == ["sliding_attention", "full_attention"]
    assert [layer.self_attn.is_sliding for layer in tail.model.model.layers] == [True, False]
    tail.model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.layer_types == ["sliding_attention", "full_attention"]

    bi = prune_student(teacher, StudentSpec(layers=2, ffn=64, heads=2, kv_heads=1), calib)
    assert bi.model.config.layer_types == [types[i] for i in bi.kept_layers]


def test_qwen2_window_layers_follow_the_kept_blocks():
    cfg = tiny_config("qwen2", 384)
    cfg = type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 16,
                       "max_window_layers": 2, "layer_types": None})
    assert cfg.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = student_config(cfg, StudentSpec(layers=2, heads=2, kv_heads=1), (1, 2))
    assert student.layer_types == ["full_attention", "sliding_attention"] and student.max_window_layers == 1
    assert student.head_dim == 16 and student.num_attention_heads == 2 and cfg.num_attention_heads == 4
    assert copy.deepcopy(student).to_dict()["head_dim"] == 16


def _nll(model, ids: torch.Tensor) -> float:
    logits = _logits(model, ids)[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_importance_is_the_nll_increase_when_a_block_is_skipped(tiny_models, calib, arch):
    teacher = _load(tiny_models, arch)
    family = family_of_model(teacher)[0]

    def silence(model, b):
        with torch.no_grad():
            for path in (family.o, family.down):
                module = _block(model, b).get_submodule(path)
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()

    silence(teacher, 0)
    scores = layer_importance(teacher, calib, "loss")
    empty = copy.deepcopy(teacher)
    silence(empty, 1)                                    # skipping block 1 leaves no block at all
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] == pytest.approx(_nll(empty, calib) - _nll(teacher, calib), abs=1e-5)
    assert abs(scores[1]) > 1e-4
