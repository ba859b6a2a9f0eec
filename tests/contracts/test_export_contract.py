"""The export-format contract: every registered format reloads to the model the trial scored.

For each format of :mod:`autocomp.exporters` (iterated from the registry, so a new format joins by
registering) and several architectures (GPT-2's Conv1D included), a mixed plan (4- and 3-bit groups,
symmetric and asymmetric, 2:4 and unstructured sparsity, a calibrated method) is exported with
``autocomp.compress`` and reloaded with the format's own ``load``; its logits are compared with those
of the model :func:`autocomp.pipeline.apply.apply_plan` built in memory: bit-equal for a format that
stores float32 weights, within the 16-bit storage rounding for the others.
"""

from __future__ import annotations

import json

import pytest
import torch

from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan
from autocomp.exporters import available_formats, get_format
from autocomp.inputs.models import load_model
from autocomp.pipeline.apply import apply_plan

# formats whose stored weights are the float32 simulated weights themselves
EXACT = {"float"}

MIXED = CompressionPlan(
    default=LayerPlan(method="rtn", bits=4, group_size=32),
    layers=(("re:.*\\.0\\..*", LayerPlan(method="rtn", bits=3, group_size=32, symmetric=True)),
            ("re:.*mlp.*", LayerPlan(method="magnitude+rtn", pattern="2:4", bits=4, group_size=32)),
            ("re:.*\\.1\\..*(q_proj|c_attn|k_proj).*", LayerPlan(method="wanda", sparsity=0.5))),
    calibration=CalibrationSpec("wikitext2", "validation", 2, 32, 0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("fmt", available_formats())
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_every_format_reloads_to_the_scored_model(fmt, arch, tiny_models, tmp_path):
    import autocomp

    folder = str(tiny_models[arch])
    scored = apply_plan(load_model(folder), MIXED)
    assert scored.pipeline == "dense" and any(not lp.is_dense for lp in scored.per_layer.values())
    out = autocomp.compress(folder, MIXED, tmp_path / "out", format=fmt)
    info = json.loads((out / "autocomp.json").read_text())
    assert info["format"] == fmt and info["calibration_pipeline"] == "dense"
    reloaded = get_format(fmt).load(out)
    ids = torch.randint(0, scored.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want, got = _logits(scored.model, ids), _logits(reloaded, ids)
    if fmt in EXACT:
        assert torch.equal(want, got)
    else:  # 16-bit storage of scales and of the tensors that are not compressed
        assert (want - got).abs().max() <= 2e-2 * want.abs().max() + 1e-3
        assert not torch.equal(_logits(load_model(folder).model, ids), got), "the export holds the dense model"


def test_an_unknown_format_is_a_named_error(tiny_models, tmp_path):
    import autocomp
    from autocomp.errors import PlanError

    with pytest.raises(PlanError, match="is not one of"):
        autocomp.compress(str(tiny_models["llama"]), MIXED, tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
