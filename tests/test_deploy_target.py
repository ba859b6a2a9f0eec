"""Deployment-aware search spaces: ``deploy_target`` refuses choices its engine cannot hold at their
accounted size, ties what the engine fuses, and every configuration such a space proposes passes
the export check of its engine; a study's export defaults to its target's format."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pytest

from autocomp.config.space import SearchSpace
from autocomp.errors import SpaceError
from autocomp.exporters import ExportOptions, get_format
from autocomp.inputs.targets import find_targets


@pytest.mark.parametrize("target, quantization, embeddings, mentions", [
    ("vllm", {"bits": [3, 4, 16], "symmetric": [True]}, False, ["bits [3]"]),
    ("vllm", {"bits": [4, 16], "symmetric": [False]}, False, ["asymmetric"]),
    ("vllm", {"bits": [4, 16], "symmetric": [True]}, True, ["embedding", "targets.embeddings"]),
    ("llamacpp", {"bits": [4, 16], "symmetric": [True], "group_size": [128]}, True, ["group sizes [128]"]),
    ("llamacpp", {"bits": [3, 4], "symmetric": [True], "group_size": [32]}, True, ["bits [3]"]),
    ("llamacpp", {"bits": [4], "symmetric": [True], "group_size": [32]}, True, ["sparsity levels"]),
])
def test_choices_the_target_cannot_hold_are_refused(target, quantization, embeddings, mentions):
    data = {"name": "t", "deploy_target": target, "targets": {"embeddings": embeddings},
            "quantization": {"methods": ["rtn"], **quantization}}
    if quantization["bits"] == [4]:
        data["sparsity"] = {"methods": ["magnitude"], "levels": [0.0, "2:4"]}
    with pytest.raises(SpaceError, match=f"deploy_target {target} cannot hold") as err:
        SearchSpace.from_dict(data, "t.yaml")
    for word in mentions:
        assert word in str(err.value)


def test_an_unknown_target_is_refused():
    with pytest.raises(SpaceError, match="deploy_target 'onnx' is not one of vllm, llamacpp, torch"):
        SearchSpace.from_dict({"name": "t", "deploy_target": "onnx"}, "t.yaml")


def test_a_space_without_a_target_keeps_its_stored_form():
    """Golden study hashes (test_spec_hashes.py) depend on it: no key is added."""
    assert "deploy_target" not in SearchSpace.load("mixed").to_dict()
    assert SearchSpace.load("vllm").to_dict()["deploy_target"] == "vllm"
    assert SearchSpace.from_dict(SearchSpace.load("vllm").to_dict(), "again").deploy_target == "vllm"


def _proposals(space: SearchSpace, targets, n: int = 12):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    chosen = space.select_targets(targets)
    for _ in range(n):
        yield space.suggest(study.ask(), chosen)


def test_vllm_ties_the_layers_it_fuses(llama):
    targets = find_targets(llama.model)
    space = SearchSpace.load("vllm")
    groups = space.groups(space.select_targets(targets))
    assert "block.0.q+k+v" in groups and "block.1.gate+up" in groups
    assert [t.role for t in groups["block.0.q+k+v"]] == ["q", "k", "v"]
    for per_layer in _proposals(space, targets):
        for block in range(llama.model.config.num_hidden_layers):
            prefix = f"model.layers.{block}."
            assert len({per_layer[prefix + f"self_attn.{r}_proj"] for r in "qkv"}) == 1
            assert per_layer[prefix + "mlp.gate_proj"] == per_layer[prefix + "mlp.up_proj"]


@pytest.mark.parametrize("space_name, fmt, arch", [("vllm", "compressed-tensors", "llama"),
                                                   ("vllm", "compressed-tensors", "qwen2"),
                                                   ("llamacpp", "gguf", "llama"), ("llamacpp", "gguf", "gemma3")])
def test_every_proposal_passes_the_targets_export_check(space_name, fmt, arch, tiny_models):
    from autocomp.evaluators.size import layer_size
    from autocomp.inputs.models import load_model

    loaded = load_model(str(tiny_models[arch]))
    targets = find_targets(loaded.model)
    space = SearchSpace.load(space_name)
    check = get_format(fmt).check
    for per_layer in _proposals(space, targets, n=20):
        applied = SimpleNamespace(model=loaded.model, targets=targets, per_layer=per_layer)
        check(applied, ExportOptions(target=space.deploy.export_target))   # raises PlanError otherwise
        if fmt == "gguf":   # every quantized layer is a whole number of exact blocks: bytes as accounted
            for t in targets:
                lp = per_layer.get(t.name)
                if lp is not None and lp.quantizer:
                    block = {4: 18, 5: 22, 8: 34}[lp.bits]
                    assert layer_size(t.out_features, t.in_features, lp).bytes == t.numel // 32 * block


def test_a_conv1d_model_cannot_be_searched_for_vllm(tiny_models):
    from autocomp.inputs.models import load_model

    targets = find_targets(load_model(str(tiny_models["gpt2"])).model)
    with pytest.raises(SpaceError, match="Conv1D"):
        SearchSpace.load("vllm").select_targets(targets)


@pytest.mark.parametrize("space_name, fmt, target", [("llamacpp", "gguf", None),
                                                     ("vllm", "compressed-tensors", "vllm")])
def test_a_studys_export_takes_its_targets_format(tiny_models, tmp_path, space_name, fmt, target):
    from autocomp import api
    from autocomp.config.spec import StudySpec
    from autocomp.inputs.data import WindowSpec
    from autocomp.study.local import run_local

    space = SearchSpace.from_dict({**SearchSpace.load(space_name).to_dict(), "quantization": {
        **SearchSpace.load(space_name).to_dict()["quantization"], "methods": ["rtn"]}}, "data-free copy")
    spec = StudySpec(model=str(tiny_models["llama"]), space=space, eval_windows=WindowSpec(2, 32),
                     calib_windows=WindowSpec(2, 32, 0))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert run_local(spec, url, "deploy", 2, progress=False, echo=lambda m: None).failed == 0
    out = api.export(url, "deploy", 1, tmp_path / "out")
    info = json.loads((out / "autocomp.json").read_text())
    assert info["format"] == fmt and info.get("target") == target
