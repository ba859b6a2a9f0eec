"""Search spaces: the shipped YAML files, validation errors, grouping, suggestion, baselines, round trip."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml

from autocomp.pipeline.layer import compress_weight
from autocomp.compressors.registry import available_compressors, get_compressor
from autocomp.errors import PlanError, SpaceError
from autocomp.inputs.models import load_model
from autocomp.config.plan import DENSE, LayerPlan
from autocomp.config.space import BUILTIN_DIR, SearchSpace
from autocomp.inputs.targets import find_targets

SPACE_DIR = Path(__file__).resolve().parent.parent / "autocomp" / "config" / "spaces"
SHIPPED = sorted(SPACE_DIR.glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def llama_targets(tiny_models):
    return find_targets(load_model(str(tiny_models["llama"])).model)


@pytest.fixture(scope="module")
def gemma_targets(tiny_models):
    return find_targets(load_model(str(tiny_models["gemma3"])).model)


def _write(tmp_path: Path, data, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BASE = {
    "name": "t",
    "targets": {"include": ["re:.*"], "exclude": [], "embeddings": False},
    "granularity": "layer",
    "sparsity": {"methods": ["magnitude", "wanda"], "levels": [0.0, 0.5, "2:4"]},
    "quantization": {"methods": ["rtn"], "bits": [4, 8, 16], "group_size": [32, -1], "symmetric": [False, True]},
    "baselines": True,
}


def _with(section: str | None, key: str, value):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    if section is None:
        data[key] = value
    else:
        data[section][key] = value
    return data


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def test_shipped_spaces_found():
    assert SPACE_DIR == BUILTIN_DIR
    assert {p.stem for p in SHIPPED} >= {"bits", "demo", "mixed", "sparsity"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_spaces_load(path, llama_targets, gemma_targets):
    space = SearchSpace.load(path)
    assert space.name == path.stem
    assert space.source == str(path)
    assert SearchSpace.load(path.stem) == space  # by built-in name
    raw = yaml.safe_load(path.read_text())
    assert list(space.bits) == raw["quantization"]["bits"]
    assert space.granularity == raw.get("granularity", "layer")
    for targets in (llama_targets, gemma_targets):
        chosen = space.select_targets(targets)
        assert chosen
        plan = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(), chosen)
        assert set(plan) == {t.name for t in chosen}
        assert all(isinstance(lp, LayerPlan) for lp in plan.values())


def test_shipped_values():
    mixed = SearchSpace.load(SPACE_DIR / "mixed.yaml")
    assert mixed.prune_methods == ("wanda",) and mixed.levels == (0.0, 0.25, 0.5)
    assert mixed.bits == (4, 6, 8, 16) and mixed.embeddings is True
    sparsity = SearchSpace.load(SPACE_DIR / "sparsity.yaml")
    assert sparsity.levels[-1] == "2:4" and sparsity.bits == (16,)
    demo = SearchSpace.load(SPACE_DIR / "demo.yaml")
    assert demo.granularity == "block" and demo.symmetric == (False,)


def test_missing_space():
    with pytest.raises(SpaceError, match=r"search space nosuch not found.*bits.*mixed"):
        SearchSpace.load("nosuch")


@pytest.mark.parametrize("section,key,value,pattern", [
    (None, "granularty", "layer", r"unknown key 'granularty'; allowed keys: name, description, targets"),
    ("sparsity", "level", [0.5], r"sparsity: unknown key 'level'; allowed keys: methods, levels"),
    ("quantization", "bit", [4], r"quantization: unknown key 'bit'; allowed keys: methods, bits, group_size, symmetric"),
    ("targets", "includes", ["re:.*"], r"targets: unknown key 'includes'; allowed keys: include, exclude, embeddings"),
    ("quantization", "bits", [4, 7], r"quantization\.bits: 7 is not allowed; allowed: \[2, 3, 4, 5, 6, 8, 16\]"),
    ("quantization", "bits", [4, True], r"quantization\.bits: True is not allowed"),
    ("quantization", "bits", [], r"quantization\.bits: expected a non-empty list"),
    ("sparsity", "levels", [0.0, 1.0], r"sparsity\.levels: 1\.0 is neither a fraction in \[0, 1\) nor an N:M pattern"),
    ("sparsity", "levels", [-0.1], r"sparsity\.levels: -0\.1 is neither"),
    ("sparsity", "levels", ["4:2"], r"sparsity\.levels: '4:2' is neither"),
    ("sparsity", "levels", ["half"], r"sparsity\.levels: 'half' is neither"),
    ("sparsity", "levels", [True], r"sparsity\.levels: True is neither"),
    (None, "granularity", "head", r"granularity 'head' is not allowed; allowed: layer, block, role, uniform"),
    ("sparsity", "methods", ["nosuchpruner"], r"sparsity\.methods: 'nosuchpruner' is not a pruner; allowed: magnitude, .*wanda"),
    ("sparsity", "methods", ["rtn"], r"'rtn' is not a pruner"),
    ("quantization", "methods", ["nosuchquant"], r"quantization\.methods: 'nosuchquant' is not a quantizer; allowed: .*rtn"),
    ("quantization", "methods", ["wanda"], r"'wanda' is not a quantizer"),
    ("quantization", "group_size", [0], r"quantization\.group_size: 0 must be a positive integer or -1"),
    ("quantization", "symmetric", ["no"], r"quantization\.symmetric: 'no' must be true or false"),
    ("targets", "embeddings", "yes", r"targets\.embeddings must be true or false"),
    ("targets", "include", ["re:("], r"targets: 're:\(' is not a valid regular expression"),
    ("targets", "include", "re:.*", r"targets\.include: expected a non-empty list"),
    ("targets", "exclude", "re:k_proj", r"targets\.exclude: expected a list, got 're:k_proj'"),
    (None, "baselines", "yes", r"baselines must be true or false"),
    (None, "name", "", r"'name' must be a non-empty string"),
])
def test_space_errors_name_file_and_key(tmp_path, section, key, value, pattern):
    path = _write(tmp_path, _with(section, key, value), "broken_space.yaml")
    with pytest.raises(SpaceError, match=pattern) as info:
        SearchSpace.load(path)
    assert str(info.value).startswith(str(path) + ":"), str(info.value)


def test_space_bad_yaml_and_non_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpaceError, match=r"x\.yaml: YAML syntax error at line \d+, column \d+"):
        SearchSpace.load(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpaceError, match=r"x\.yaml: expected a mapping"):
        SearchSpace.load(path)
    path.write_text(yaml.safe_dump({"name": "t", "sparsity": [0.5]}))
    with pytest.raises(SpaceError, match=r"x\.yaml: sparsity: expected a mapping with keys \['methods', 'levels'\]"):
        SearchSpace.load(path)


def test_valid_base_loads_and_defaults(tmp_path):
    space = SearchSpace.load(_write(tmp_path, BASE))
    assert space.levels == (0.0, 0.5, "2:4")
    assert space.group_sizes == (32, -1) and space.symmetric == (False, True)
    minimal = SearchSpace.load(_write(tmp_path, {"name": "m"}, "m.yaml"))
    assert minimal.bits == (16,) and minimal.levels == (0.0,) and minimal.granularity == "layer"
    assert minimal.include == ("re:.*",) and minimal.embeddings is False


# ---------------------------------------------------------------------------------------------
# targets and groups
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity,embeddings,expected", [
    # tiny llama: 2 blocks x 7 layers (q k v o gate up down); untied embed + lm_head
    ("layer", False, 14), ("block", False, 2), ("role", False, 7), ("uniform", False, 1),
    ("layer", True, 16), ("block", True, 4), ("role", True, 9), ("uniform", True, 3),
])
def test_granularity_groups(llama_targets, granularity, embeddings, expected):
    space = SearchSpace.from_dict({**BASE, "granularity": granularity,
                                   "targets": {"include": ["re:.*"], "embeddings": embeddings}}, "t.yaml")
    chosen = space.select_targets(llama_targets)
    assert len(chosen) == (16 if embeddings else 14)
    groups = space.groups(chosen)
    assert len(groups) == expected
    assert sum(len(v) for v in groups.values()) == len(chosen)
    if granularity == "block":
        assert sorted(len(v) for k, v in groups.items() if k.startswith("block.")) == [7, 7]
    if granularity == "role":
        assert {k for k in groups if k.startswith("role.")} == {f"role.{r}" for r in ("q", "k", "v", "o", "gate", "up", "down")}
        assert all(len(groups[f"role.{r}"]) == 2 for r in ("q", "down"))
    if embeddings:
        assert groups["embed"][0].name == "model.embed_tokens"
        assert groups["lm_head"][0].name == "lm_head"


def test_select_targets_include_exclude(llama_targets, tmp_path):
    space = SearchSpace.from_dict({**BASE, "targets": {"include": ["re:mlp"], "exclude": ["re:layers\\.1\\."]}}, "t.yaml")
    chosen = space.select_targets(llama_targets)
    assert [t.name for t in chosen] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    space = SearchSpace.from_dict({**BASE, "targets": {"include": ["re:nothing_here"]}}, "t.yaml")
    with pytest.raises(SpaceError, match=r"t\.yaml: targets\.include 're:nothing_here' matches no layer"):
        space.select_targets(llama_targets)
    space = SearchSpace.from_dict({**BASE, "targets": {"include": ["re:mlp"], "exclude": ["re:.*"]}}, "t.yaml")
    with pytest.raises(SpaceError, match="no layer left"):
        space.select_targets(llama_targets)
    space = SearchSpace.from_dict({**BASE, "sparsity": {"methods": ["magnitude"], "levels": ["4:128"]}}, "t.yaml")
    with pytest.raises(SpaceError, match=r"level '4:128' needs input sizes divisible by 128"):
        space.select_targets(llama_targets)


# ---------------------------------------------------------------------------------------------
# suggest
# ---------------------------------------------------------------------------------------------

def _expected_plan(space: SearchSpace, values: dict, data_free_only: bool = False) -> LayerPlan:
    level = values.get("sparsity", space.levels[0])
    bits = values.get("bits", space.bits[0])
    pruner = values.get("prune", space.prune_methods[0])
    sparse = isinstance(level, str) or level > 0
    if data_free_only and pruner == "wanda":
        pruner = "magnitude"
    method = "+".join(m for m in ((pruner if sparse else None), ("rtn" if bits < 16 else None)) if m) or "none"
    dense_q = bits == 16
    return LayerPlan(method=method,
                     sparsity=0.0 if isinstance(level, str) else level,
                     pattern=level if isinstance(level, str) else "unstructured",
                     bits=bits,
                     group_size=128 if dense_q else values.get("group_size", space.group_sizes[0]),
                     symmetric=False if dense_q else values.get("symmetric", space.symmetric[0]))


def test_suggest_fixed_trial(llama_targets):
    space = SearchSpace.from_dict({**BASE, "granularity": "role",
                                   "targets": {"include": ["re:.*"], "embeddings": True}}, "t.yaml")
    chosen = space.select_targets(llama_targets)
    groups = space.groups(chosen)
    dims = ("sparsity", "prune", "bits", "group_size", "symmetric")  # quant has one choice: not suggested
    choice = {
        "role.q": (0.5, "wanda", 4, 32, True),
        "role.k": ("2:4", "magnitude", 8, -1, False),
        "role.v": (0.0, "wanda", 16, -1, True),      # dense: canonical
        "role.o": (0.5, "magnitude", 16, 32, False),
        "role.gate": ("2:4", "wanda", 16, 32, False),
        "role.up": (0.0, "magnitude", 4, -1, True),
        "role.down": (0.5, "wanda", 8, 32, False),
        "embed": (0.5, "wanda", 8, 32, False),       # untied input embedding: wanda -> magnitude
        "lm_head": (0.5, "wanda", 4, -1, False),     # lm_head has its own inputs: wanda stays
    }
    assert set(choice) == set(groups)
    params = {f"{g}:{d}": v for g, vals in choice.items() for d, v in zip(dims, vals)}
    plan = space.suggest(optuna.trial.FixedTrial(params), chosen)
    assert set(plan) == {t.name for t in chosen}
    for group, members in groups.items():
        values = dict(zip(dims, choice[group]))
        expected = _expected_plan(space, values, data_free_only=(group == "embed"))
        for t in members:
            assert plan[t.name] == expected, (t.name, plan[t.name], expected)
    q = plan["model.layers.0.self_attn.q_proj"]
    assert q == LayerPlan(method="wanda+rtn", sparsity=0.5, bits=4, group_size=32, symmetric=True)
    assert plan["model.layers.1.self_attn.v_proj"] == DENSE
    assert plan["model.embed_tokens"].method == "magnitude+rtn"
    assert plan["lm_head"].method == "wanda+rtn"
    assert plan["model.layers.0.self_attn.k_proj"] == LayerPlan(method="magnitude+rtn", pattern="2:4", bits=8, group_size=-1)


@pytest.mark.parametrize("granularity", ["layer", "block", "role", "uniform"])
def test_suggest_random_trials(llama_targets, granularity):
    space = SearchSpace.from_dict({**BASE, "granularity": granularity}, "t.yaml")
    chosen = space.select_targets(llama_targets)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    n_groups = len(space.groups(chosen))
    seen_methods = set()
    for _ in range(8):
        trial = study.ask()
        plan = space.suggest(trial, chosen)
        # every group asks for every non-trivial dimension: 5 of them here (quant has one choice)
        assert len(trial.params) == 5 * n_groups
        for group, members in space.groups(chosen).items():
            values = {k.rsplit(":", 1)[1]: v for k, v in trial.params.items() if k.rsplit(":", 1)[0] == group}
            assert set(values) == {"sparsity", "prune", "bits", "group_size", "symmetric"}
            for t in members:
                lp = plan[t.name]
                assert lp == _expected_plan(space, values)
                assert lp.bits in space.bits
                if lp.nm:
                    assert t.in_features % lp.nm[1] == 0
                seen_methods.add(lp.method)
        if granularity == "uniform":
            assert len({lp for lp in plan.values()}) == 1
        study.tell(trial, 1.0)
    assert len(seen_methods) > 1


# ---------------------------------------------------------------------------------------------
# baselines and describe_uniform
# ---------------------------------------------------------------------------------------------

def test_baselines_mixed(llama_targets):
    space = SearchSpace.load(SPACE_DIR / "mixed.yaml")
    chosen = space.select_targets(llama_targets)
    groups = space.groups(chosen)
    baselines = space.baseline_params(chosen)
    assert len(baselines) == 3 * 4  # levels x bits
    described = []
    for params in baselines:
        assert set(params) == {f"{g}:{d}" for g in groups for d in ("sparsity", "bits")}
        assert len({(params[f"{g}:sparsity"], params[f"{g}:bits"]) for g in groups}) == 1
        described.append(space.describe_uniform(params))
        plan = space.suggest(optuna.trial.FixedTrial(params), chosen)
        block_plans = {lp for n, lp in plan.items() if n.startswith("model.layers.")}
        assert len(block_plans) == 1
    # levels x bits in order: (0.0, 4), (0.0, 6), (0.0, 8), (0.0, 16), (0.25, 4), ...
    assert described[:4] == ["uniform rtn 4b", "uniform rtn 6b", "uniform rtn 8b", "uniform dense"]
    assert "uniform wanda 0.5 + rtn 4b" in described
    assert "uniform wanda 0.25" in described
    assert len(set(described)) == 12


def test_baselines_sparsity_and_bits(llama_targets):
    space = SearchSpace.load(SPACE_DIR / "sparsity.yaml")
    chosen = space.select_targets(llama_targets)
    described = [space.describe_uniform(p) for p in space.baseline_params(chosen)]
    assert described == ["uniform dense", "uniform magnitude 0.1", "uniform magnitude 0.2", "uniform magnitude 0.3",
                         "uniform magnitude 0.4", "uniform magnitude 0.5", "uniform magnitude 2:4"]
    space = SearchSpace.load(SPACE_DIR / "bits.yaml")
    described = [space.describe_uniform(p) for p in space.baseline_params(space.select_targets(llama_targets))]
    assert described == ["uniform rtn 3b", "uniform rtn 4b", "uniform rtn 5b", "uniform rtn 6b", "uniform rtn 8b", "uniform dense"]


def test_baselines_large_product_and_off(llama_targets):
    data = {**BASE, "sparsity": {"methods": ["magnitude"], "levels": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]},
            "quantization": {"methods": ["rtn"], "bits": [2, 3, 4, 8, 16]}}
    space = SearchSpace.from_dict(data, "t.yaml")
    chosen = space.select_targets(llama_targets)
    baselines = space.baseline_params(chosen)
    # 6 x 5 = 30 > 16: every level at 16 bits, then every bit width at the first level (0.0/16 once)
    assert len(baselines) == 6 + 5 - 1
    described = [space.describe_uniform(p) for p in baselines]
    assert described[:6] == ["uniform dense"] + [f"uniform magnitude {s:g}" for s in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert described[6:] == ["uniform rtn 2b", "uniform rtn 3b", "uniform rtn 4b", "uniform rtn 8b"]
    assert SearchSpace.from_dict({**data, "baselines": False}, "t.yaml").baseline_params(chosen) == []


def test_describe_uniform_rejects_mixed(llama_targets):
    space = SearchSpace.load(SPACE_DIR / "mixed.yaml")
    chosen = space.select_targets(llama_targets)
    params = dict(space.baseline_params(chosen)[5])
    assert space.describe_uniform(params) is not None
    first = next(iter(params))
    group = first.rsplit(":", 1)[0]
    params[f"{group}:bits"] = 8 if params[f"{group}:bits"] != 8 else 4
    assert space.describe_uniform(params) is None


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_to_dict_from_dict_round_trip(path, tmp_path):
    space = SearchSpace.load(path)
    data = space.to_dict()
    again = SearchSpace.from_dict(data, "roundtrip")
    assert again == space
    assert again.to_dict() == data
    # through YAML as well (what a study stores)
    assert SearchSpace.load(_write(tmp_path, data, "rt.yaml")) == space


def test_round_trip_custom(tmp_path):
    space = SearchSpace.load(_write(tmp_path, {**BASE, "description": "d", "granularity": "role",
                                               "targets": {"include": ["re:mlp", "re:attn"], "exclude": ["re:k_proj"],
                                                           "embeddings": True}}))
    again = SearchSpace.from_dict(space.to_dict(), "x")
    assert again == space
    assert again.exclude == ("re:k_proj",) and again.include == ("re:mlp", "re:attn")
    assert again.levels == (0.0, 0.5, "2:4")
    assert again != SearchSpace.from_dict({**space.to_dict(), "granularity": "layer"}, "x")


def test_single_configuration_space_baseline_is_uniform(llama_targets):
    # no dimension with more than one choice: the one baseline (no params) is still a uniform configuration
    space = SearchSpace.from_dict({"name": "one", "sparsity": {"methods": ["magnitude"], "levels": ["2:4"]},
                                   "quantization": {"methods": ["rtn"], "bits": [4]}}, "one.yaml")
    chosen = space.select_targets(llama_targets)
    baselines = space.baseline_params(chosen)
    assert baselines == [{}]
    assert space.describe_uniform(baselines[0]) == "uniform magnitude 2:4 + rtn 4b"
    plan = space.suggest(optuna.trial.FixedTrial({}), chosen)
    assert set(plan.values()) == {LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4)}


def test_calibrated_methods_fall_back_on_layers_without_inputs(llama_targets):
    # the untied llama input embedding has no activations: calibrated pruners / quantizers are
    # replaced by data-free ones there (a plan naming them would fail for every trial)
    from autocomp.compressors.ggml import GGML_METHODS

    # llama.cpp's types have their own space rules (test_gguf_space_...)
    calibrated_q = [q for q in available_compressors("quant") if get_compressor(q).needs_calibration
                    and q not in GGML_METHODS]
    quant_methods = ["rtn"] + calibrated_q
    space = SearchSpace.from_dict({"name": "c", "targets": {"include": ["re:.*"], "embeddings": True},
                                   "sparsity": {"methods": ["wanda"], "levels": [0.0, 0.5]},
                                   "quantization": {"methods": quant_methods[::-1], "bits": [4, 16]}}, "c.yaml")
    chosen = space.select_targets(llama_targets)
    params = {f"{g}:{d}": v for g in space.groups(chosen)
              for d, v in (("sparsity", 0.5), ("bits", 4), ("quant", quant_methods[-1]))
              if d != "quant" or len(quant_methods) > 1}
    plan = space.suggest(optuna.trial.FixedTrial(params), chosen)
    emb = plan["model.embed_tokens"]
    assert emb.pruner == "magnitude" and emb.quantizer == "rtn"
    assert plan["lm_head"].pruner == "wanda" and plan["lm_head"].quantizer == quant_methods[-1]
    out = compress_weight(torch.randn(384, 64), emb, None)  # no statistics needed
    assert out.mask is not None and out.quant is not None


def test_gguf_space_takes_llama_cpp_types_and_the_embedding_falls_back_to_ggml(llama_targets):
    """The built-in ``gguf`` space: ggml-imatrix per role, the embedding (no input statistics) ggml;
    llama.cpp's types need deploy_target llamacpp, bits of a K-quant, no sparsity, no other methods."""
    space = SearchSpace.load("gguf")
    chosen = space.select_targets(llama_targets)
    params = {f"{g}:bits": 4 for g in space.groups(chosen)}
    plan = space.suggest(optuna.trial.FixedTrial(params), chosen)
    assert plan["model.embed_tokens"].method == "ggml"
    assert plan["model.layers.0.mlp.down_proj"].method == "ggml-imatrix"
    base = {"name": "g", "quantization": {"methods": ["ggml-imatrix"], "bits": [4, 16]}}
    for extra, words in [({}, "deploy_target"),
                         ({"deploy_target": "vllm"}, "only deploy_target llamacpp"),
                         ({"deploy_target": "llamacpp", "quantization": {"methods": ["ggml", "rtn"], "bits": [4]}}, "mix"),
                         ({"deploy_target": "llamacpp", "sparsity": {"methods": ["wanda"], "levels": [0.0, 0.5]}},
                          "sparsity"),
                         ({"deploy_target": "llamacpp", "presets": ["Q4_0"]}, "not llama.cpp presets of K-quant"),
                         ({"deploy_target": "llamacpp", "presets": "Q4_K_M"}, "expected a non-empty list")]:
        with pytest.raises(SpaceError, match=words):
            SearchSpace.from_dict({**base, **extra}, "g.yaml")
    with pytest.raises(PlanError, match="cannot hold pruned weights"):
        LayerPlan(method="wanda+ggml", sparsity=0.5, bits=4)
    with pytest.raises(SpaceError, match="need quantization.methods"):
        SearchSpace.from_dict({"name": "p", "presets": ["Q4_K_M"], "quantization": {"methods": ["rtn"], "bits": [4]}},
                              "p.yaml")
    assert space.presets and SearchSpace.from_dict(space.to_dict(), "again").presets == space.presets
