"""CompressionPlan: JSON round trips, documented resolution on a tiny llama, validation errors, and
bit-identical rebuilding / stitching of weights."""

from __future__ import annotations

import json

import pytest
from tiny import state_copy
import torch

from autocomp.pipeline.calibration import collect_input_stats, stats_digest
from autocomp.errors import AutocompError, PlanError
from autocomp.inputs.models import load_model
from autocomp.config.plan import DENSE, CalibrationSpec, CompressionPlan, LayerPlan, parse_nm
from autocomp.pipeline.stitch import ModelStitcher
from autocomp.inputs.targets import block_targets, extra_targets, find_targets

EXAMPLE = {"version": 1, "default": {"method": "rtn", "bits": 4, "group_size": 128},
           "layers": {"re:.*down_proj$": {"method": "rtn", "bits": 8}}}


@pytest.fixture(scope="module")
def llama_names(tiny_models):
    lm = load_model(str(tiny_models["llama"]))
    targets = find_targets(lm.model)
    return [t.name for t in block_targets(targets)], [t.name for t in extra_targets(targets)]


def _resolve(plan: CompressionPlan, names) -> dict[str, LayerPlan]:
    return plan.resolve(*names)


# ---------------------------------------------------------------------------------------------
# JSON round trip
# ---------------------------------------------------------------------------------------------

def _rich_plan() -> CompressionPlan:
    return CompressionPlan(
        default=LayerPlan(method="wanda+rtn", sparsity=0.37, bits=4, group_size=64, symmetric=True),
        layers=(("re:.*down_proj$", LayerPlan(method="rtn", bits=8, group_size=-1)),
                ("model.layers.0.self_attn.q_proj", LayerPlan(method="magnitude", pattern="2:4")),
                ("re:.*k_proj$", LayerPlan()),
                ("lm_head", LayerPlan(method="magnitude+rtn", pattern="4:8", bits=3))),
        embeddings=True,
        calibration=CalibrationSpec(data="wikitext2", split="validation", windows=4, seq_len=64, seed=3),
    )


def test_json_round_trip(tmp_path):
    plan = _rich_plan()
    text = plan.to_json()
    again = CompressionPlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    data = json.loads(text)
    assert data["version"] == 1
    assert list(data["layers"]) == ["re:.*down_proj$", "model.layers.0.self_attn.q_proj", "re:.*k_proj$", "lm_head"]
    assert data["layers"]["model.layers.0.self_attn.q_proj"]["sparsity"] == 0.5  # implied by 2:4
    assert data["calibration"]["windows"] == 4
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = CompressionPlan.load(path)
    assert loaded == plan
    assert loaded.layers[1][1].nm == (2, 4)
    # a minimal plan, and the documented example
    assert CompressionPlan.from_json(CompressionPlan().to_json()) == CompressionPlan()
    ex = CompressionPlan.from_dict(EXAMPLE)
    assert CompressionPlan.from_json(ex.to_json()) == ex
    assert ex.default == LayerPlan(method="rtn", bits=4, group_size=128)
    # a different plan is not equal
    assert CompressionPlan.from_json(text.replace('"seed": 3', '"seed": 4')) != plan


def test_layer_plan_key_is_canonical():
    a = LayerPlan.from_dict({"method": "magnitude", "pattern": "2:4"})
    b = LayerPlan.from_dict({"method": "magnitude", "pattern": "2:4", "sparsity": 0.5})
    assert a == b and a.key() == b.key()
    assert LayerPlan.from_dict(a.to_dict()) == a
    assert a.key() != LayerPlan(method="magnitude", pattern="1:4").key()


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan file"):
        CompressionPlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match=r"bad\.json: not valid JSON"):
        CompressionPlan.load(bad)
    bad.write_text(json.dumps({"version": 1, "default": {"method": "rtn", "bits": 7}}))
    with pytest.raises(PlanError, match=r"bad\.json.*bits must be one of"):
        CompressionPlan.load(bad)


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------

def test_example_plan_resolves_as_documented(llama_names):
    blocks, extras = llama_names
    assert extras == ["model.embed_tokens", "lm_head"]
    resolved = _resolve(CompressionPlan.from_dict(EXAMPLE), llama_names)
    assert list(resolved) == blocks + extras
    four = LayerPlan(method="rtn", bits=4, group_size=128)
    eight = LayerPlan(method="rtn", bits=8)
    downs = [n for n in blocks if n.endswith("down_proj")]
    assert len(downs) == 2
    for name in blocks:
        assert resolved[name] == (eight if name in downs else four), name
    assert resolved["model.embed_tokens"] == DENSE
    assert resolved["lm_head"] == DENSE


def test_embeddings_true_and_exact_names(llama_names):
    blocks, _ = llama_names
    four = LayerPlan(method="rtn", bits=4, group_size=128)
    res = _resolve(CompressionPlan.from_dict({**EXAMPLE, "embeddings": True}), llama_names)
    assert res["model.embed_tokens"] == four and res["lm_head"] == four
    # a key naming the LM head exactly touches it even with embeddings false
    data = {**EXAMPLE, "layers": {**EXAMPLE["layers"], "lm_head": {"method": "rtn", "bits": 6, "group_size": 32}}}
    res = _resolve(CompressionPlan.from_dict(data), llama_names)
    assert res["lm_head"] == LayerPlan(method="rtn", bits=6, group_size=32)
    assert res["model.embed_tokens"] == DENSE
    # a re: key alone does not reach the embeddings when embeddings is false ...
    with pytest.raises(PlanError, match="matches no compressible layer"):
        _resolve(CompressionPlan.from_dict({"version": 1, "layers": {"re:^lm_head$": {"method": "rtn", "bits": 4}}}),
                 llama_names)
    # ... but does when it is true
    res = _resolve(CompressionPlan.from_dict({"version": 1, "embeddings": True,
                                              "layers": {"re:^lm_head$": {"method": "rtn", "bits": 4}}}), llama_names)
    assert res["lm_head"].bits == 4 and res["model.embed_tokens"] == DENSE
    assert all(res[n] == DENSE for n in blocks)
    # no default: everything dense except the named layer
    res = _resolve(CompressionPlan.from_dict({"version": 1, "layers": {blocks[3]: {"method": "magnitude", "sparsity": 0.5}}}),
                   llama_names)
    assert [n for n, lp in res.items() if lp != DENSE] == [blocks[3]]


def test_later_entries_win(llama_names):
    blocks, _ = llama_names
    proj8 = {"method": "rtn", "bits": 8}
    down3 = {"method": "rtn", "bits": 3, "group_size": 64}
    a = _resolve(CompressionPlan.from_dict({"version": 1, "layers": {"re:proj$": proj8, "re:down_proj$": down3}}), llama_names)
    b = _resolve(CompressionPlan.from_dict({"version": 1, "layers": {"re:down_proj$": down3, "re:proj$": proj8}}), llama_names)
    for name in blocks:
        if name.endswith("down_proj"):
            assert a[name].bits == 3 and a[name].group_size == 64
            assert b[name].bits == 8 and b[name].group_size == 128
        else:
            assert a[name].bits == 8 and b[name].bits == 8
    # an entry replaces the whole layer plan: omitted fields take LayerPlan defaults, not the default entry's
    plan = CompressionPlan.from_dict({"version": 1, "default": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
                                      "layers": {"re:q_proj$": {"method": "rtn", "bits": 4}}})
    res = _resolve(plan, llama_names)
    q = next(n for n in blocks if n.endswith("q_proj"))
    k = next(n for n in blocks if n.endswith("k_proj"))
    assert res[q] == LayerPlan(method="rtn", bits=4, group_size=128, symmetric=False)
    assert res[k] == LayerPlan(method="rtn", bits=4, group_size=32, symmetric=True)
    # an exact name after a pattern wins over it, and a pattern after an exact name wins over that
    res = _resolve(CompressionPlan.from_dict({"version": 1, "layers": {"re:q_proj$": proj8, q: {"method": "none"}}}), llama_names)
    assert res[q] == DENSE
    res = _resolve(CompressionPlan.from_dict({"version": 1, "layers": {q: {"method": "none"}, "re:q_proj$": proj8}}), llama_names)
    assert res[q].bits == 8


# ---------------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,pattern", [
    ({"version": 1, "defaults": {}}, r"unknown key\(s\) \['defaults'\]"),
    ({"version": 1, "default": {"method": "rtn", "bits": 4, "groupsize": 64}}, r"default: unknown key\(s\) \['groupsize'\]"),
    ({"version": 1, "layers": {"lm_head": {"method": "rtn", "bit": 4}}}, r"layers\['lm_head'\]: unknown key\(s\) \['bit'\]"),
    ({"version": 1, "calibration": {"windowz": 3}}, r"calibration: unknown key\(s\) \['windowz'\]"),
    ({"version": 1, "default": {"method": "rtn", "bits": 7}}, r"bits must be one of \[2, 3, 4, 5, 6, 8, 16\], got 7"),
    ({"version": 1, "default": {"method": "rtn", "bits": 4.0}}, r"bits must be one of"),
    ({"version": 1, "default": {"method": "rtn", "bits": True}}, r"bits must be one of"),
    ({"version": 1, "default": {"method": "nosuchq", "bits": 4}}, r"unknown compression method 'nosuchq'"),
    ({"version": 1, "default": {"method": "rtn+wanda", "bits": 4, "sparsity": 0.5}}, r"pruner first"),
    ({"version": 1, "default": {"method": "", "bits": 4}}, r"method must be a non-empty string"),
    ({"default": {"method": "rtn", "bits": 4}}, r"missing 'version'"),
    ({"version": 2}, r"plan version 2 is not supported"),
    ({"version": "one"}, r"'version' must be an integer"),
    ({"version": None}, r"'version' must be an integer"),
    ({"version": 1.7}, r"'version' must be an integer"),
    ({"version": True}, r"'version' must be an integer"),
    ({"version": 1, "default": {"method": "rtn", "bits": 4, "sparsity": 0.5}}, r"does not prune but sparsity is 0.5"),
    ({"version": 1, "default": {"method": "magnitude"}}, r"prunes but sparsity is 0"),
    ({"version": 1, "default": {"method": "magnitude", "sparsity": 0.5, "bits": 4}}, r"does not quantize but bits is 4"),
    ({"version": 1, "default": {"method": "magnitude+rtn", "sparsity": 0.5}}, r"quantizes but bits is 16"),
    ({"version": 1, "default": {"method": "magnitude", "pattern": "2:4", "sparsity": 0.3}}, r"pattern 2:4 implies sparsity 0.5"),
    ({"version": 1, "default": {"method": "magnitude", "sparsity": 1.0}}, r"sparsity must be in \[0, 1\)"),
    ({"version": 1, "default": {"method": "magnitude", "pattern": "4:2"}}, r"needs 0 < N < M"),
    ({"version": 1, "default": {"method": "magnitude", "pattern": "half"}}, r"is not 'unstructured' or 'N:M'"),
    ({"version": 1, "default": {"method": "rtn", "bits": 4, "group_size": 0}}, r"group_size must be a positive integer or -1"),
    ({"version": 1, "layers": {"re:(": {"method": "none"}}}, r"not a valid regular expression"),
    ({"version": 1, "embeddings": "yes"}, r"'embeddings' must be true or false"),
    ({"version": 1, "layers": ["re:.*"]}, r"'layers' must be an object"),
    ([1, 2], r"expected a JSON object"),
])
def test_plan_errors(data, pattern):
    with pytest.raises(PlanError, match=pattern) as info:
        CompressionPlan.from_dict(data)
    assert str(info.value).startswith("plan")  # names where the problem is
    assert isinstance(info.value, AutocompError) and info.value.exit_code == 2


def test_regex_matching_nothing_raises(llama_names):
    plan = CompressionPlan.from_dict({"version": 1, "layers": {"re:.*dwon_proj$": {"method": "rtn", "bits": 8}}})
    with pytest.raises(PlanError, match=r"'re:\.\*dwon_proj\$' matches no compressible layer.*model\.layers\.0"):
        _resolve(plan, llama_names)
    plan = CompressionPlan.from_dict({"version": 1, "layers": {"model.layers.9.mlp.down_proj": {"method": "rtn", "bits": 8}}})
    with pytest.raises(PlanError, match=r"model\.layers\.9\.mlp\.down_proj' matches no compressible layer"):
        _resolve(plan, llama_names)


def test_parse_nm():
    assert parse_nm("unstructured") is None
    assert parse_nm("2:4") == (2, 4) and parse_nm("4:8") == (4, 8)
    for bad in ("2:2", "0:4", "2-4", ""):
        with pytest.raises(PlanError):
            parse_nm(bad)


def test_needs_calibration():
    assert not CompressionPlan.from_dict(EXAMPLE).needs_calibration()
    assert CompressionPlan.from_dict({"version": 1, "layers": {"x": {"method": "wanda", "sparsity": 0.5}}}).needs_calibration()
    assert CompressionPlan(default=LayerPlan(method="wanda+rtn", pattern="2:4", bits=4)).needs_calibration()
    assert not CompressionPlan(default=LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4)).needs_calibration()


# ---------------------------------------------------------------------------------------------
# rebuilding and stitching: bit-identical weights
# ---------------------------------------------------------------------------------------------

def _fresh(folder):
    lm = load_model(str(folder))
    targets = find_targets(lm.model)
    gen = torch.Generator().manual_seed(7)
    windows = torch.randint(3, len(lm.tokenizer), (2, 16), generator=gen)
    stats = collect_input_stats(lm.model, targets, windows)
    stitcher = ModelStitcher(lm.model, targets, lm.fingerprint, stats, stats_digest(windows, lm.fingerprint))
    return lm.model, targets, stitcher


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


def _plans(targets):
    blocks = [t.name for t in block_targets(targets)]
    emb = [t.name for t in extra_targets(targets) if t.role == "embed"][0]
    plan_a = CompressionPlan.from_dict({
        "version": 1,
        "default": {"method": "wanda+rtn", "sparsity": 0.5, "bits": 4, "group_size": 32},
        "layers": {blocks[0]: {"method": "magnitude", "pattern": "2:4"},
                   blocks[-1]: {"method": "rtn", "bits": 3, "group_size": -1, "symmetric": True},
                   emb: {"method": "magnitude+rtn", "sparsity": 0.25, "bits": 8, "group_size": 64}},
    })
    plan_b = CompressionPlan.from_dict({
        "version": 1,
        "default": {"method": "rtn", "bits": 6, "group_size": 64},
        "layers": {blocks[0]: {"method": "none"},
                   blocks[1]: {"method": "wanda", "pattern": "4:8"},
                   blocks[-1]: {"method": "rtn", "bits": 3, "group_size": -1, "symmetric": True}},
    })
    names = ([t.name for t in block_targets(targets)], [t.name for t in extra_targets(targets)])
    return plan_a.resolve(*names), plan_b.resolve(*names)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_plan_rebuilds_bit_identical_and_stitches_exactly(tiny_models, arch):
    folder = tiny_models[arch]
    model1, targets, s1 = _fresh(folder)
    dense = state_copy(model1)
    res_a, res_b = _plans(targets)

    # the same plan on two fresh copies gives identical weights
    n_a = s1.apply(res_a)
    assert n_a == sum(1 for lp in res_a.values() if lp != DENSE)
    state_a = state_copy(model1)
    model2, _, s2 = _fresh(folder)
    s2.apply(res_a)
    _assert_same(state_a, state_copy(model2))
    # and the plan really changed the weights (every non-dense target), nothing else
    changed = {k for k in dense if not torch.equal(dense[k], state_a[k])}
    assert changed
    assert all(k.endswith("weight") for k in changed)
    assert s1.apply(res_a) == 0  # already holds it

    # A then B equals B directly
    s1.apply(res_b)
    model3, _, s3 = _fresh(folder)
    s3.apply(res_b)
    state_b = state_copy(model3)
    _assert_same(state_copy(model1), state_b)
    assert any(not torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert s1.current == {**{n: DENSE for n in s1.current}, **res_b}

    # back to dense, per layer (blocks[0] is dense in B) and entirely
    first = block_targets(targets)[0].name
    w_key = first + ".weight"
    assert torch.equal(state_copy(model1)[w_key], dense[w_key])
    assert not torch.equal(state_a[w_key], dense[w_key])
    s1.apply({})
    _assert_same(state_copy(model1), dense)
    s1.apply(res_a)  # and back to A again, from cached variants
    _assert_same(state_copy(model1), state_a)
    assert s1.cache.hits > 0


def test_stitcher_rejects_unknown_layer(tiny_models):
    model, targets, s = _fresh(tiny_models["llama"])
    with pytest.raises(PlanError, match="not targets of this model"):
        s.apply({"model.layers.7.mlp.up_proj": LayerPlan(method="rtn", bits=4)})
    # wanda on the untied llama input embedding (no activations of its own) names the layer
    with pytest.raises(PlanError, match="layer model.embed_tokens: wanda needs calibration"):
        s.apply({"model.embed_tokens": LayerPlan(method="wanda", sparsity=0.5)})
