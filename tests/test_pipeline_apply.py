"""The one path from a plan to a model (autocomp.pipeline.apply): the search's trials and a later
export build the same model, from the same variant cache."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import assert_ok, run_cli, search_args, sqlite_url

from autocomp.compressors.registry import compressor_needs_calibration
from autocomp.config.plan import CalibrationSpec, CompressionPlan, LayerPlan
from autocomp.inputs.models import load_model
from autocomp.pipeline.apply import PlanApplier, apply_plan, calibration_pipeline, student_fingerprint


def test_an_export_after_a_search_reads_the_variants_the_search_cached(tiny_models, tmp_path, monkeypatch):
    """Calibrated (Wanda) variants computed by the search's trials are read from the search's variant
    folder by ``autocomp export``: not one calibrated layer is compressed again."""
    import autocomp
    import autocomp.pipeline.stitch as stitch
    from autocomp.store.records import load_records

    variants = tmp_path / "variants"
    url = sqlite_url(tmp_path / "study.db")
    assert_ok(run_cli(search_args(tiny_models["llama"], url, "mixed", 6, "--no-validate", "--variant-cache", variants,
                                  space="mixed"), tmp_path, tmp_path / "cache"))
    records = load_records(url, "mixed")
    calibrated = [r for r in records.records
                  if any(compressor_needs_calibration(lp["method"]) for lp in r.plan["layers"].values())]
    assert calibrated, "the search ran no calibrated trial: nothing to reuse"
    calls: list[str] = []
    real = stitch.compress_weight

    def counting(weight, plan, stats=None):
        calls.append(plan.method)
        return real(weight, plan, stats)

    monkeypatch.setattr(stitch, "compress_weight", counting)
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    autocomp.export(url, "mixed", calibrated[0].trial, tmp_path / "out", cache_dir=variants)
    assert calls == [m for m in calls if not compressor_needs_calibration(m)], calls
    # the same export with an empty variant folder does compress them: the check above can fail
    calls.clear()
    autocomp.export(url, "mixed", calibrated[0].trial, tmp_path / "out2", cache_dir=tmp_path / "empty")
    assert any(compressor_needs_calibration(m) for m in calls)


CAL = CalibrationSpec("wikitext2", "validation", 2, 32, 0)


@pytest.mark.parametrize("mode", ["dense", "sequential"])
def test_a_reused_applier_builds_what_a_fresh_one_builds(tiny_models, mode):
    """Trials apply plan after plan to one model; each must equal the plan applied from scratch."""
    folder = str(tiny_models["llama"])
    cal = CalibrationSpec(**{**CAL.to_dict(), "mode": mode})
    plans = [CompressionPlan(default=LayerPlan(method="wanda", sparsity=0.5), calibration=cal),
             CompressionPlan(default=LayerPlan(method="rtn", bits=4, group_size=32)),
             CompressionPlan(default=LayerPlan(method="gptq", bits=3, group_size=32), calibration=cal),
             CompressionPlan(default=LayerPlan(method="wanda", sparsity=0.5), calibration=cal)]
    applier = PlanApplier(load_model(folder))
    for plan in plans:
        reused = applier.apply(plan)
        fresh = apply_plan(load_model(folder), plan)
        assert reused.pipeline == fresh.pipeline
        for (name, a), b in zip(reused.model.state_dict().items(), fresh.model.state_dict().values()):
            assert torch.equal(a, b), (plan, name)
    dense = applier.apply_layers({})
    for a, b in zip(dense.model.state_dict().values(), load_model(folder).model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_calibration_pipeline_is_chosen_from_the_plan():
    rtn, wanda = LayerPlan(method="rtn", bits=4), LayerPlan(method="wanda", sparsity=0.5)
    assert calibration_pipeline({"a": rtn}, None) == "data_free"
    assert calibration_pipeline({"a": rtn, "b": LayerPlan()}, CAL) == "data_free"
    assert calibration_pipeline({"a": wanda}, CAL) == "dense"
    assert calibration_pipeline({"a": wanda}, CalibrationSpec(mode="sequential")) == "sequential"
    from autocomp.errors import PlanError

    with pytest.raises(PlanError, match="calibration"):
        calibration_pipeline({"a": wanda}, None)


def test_one_student_fingerprint():
    from autocomp.students.spec import StudentSpec

    a, b = StudentSpec(), StudentSpec()
    assert student_fingerprint("teacher", a) == student_fingerprint("teacher", b)
    assert student_fingerprint("teacher", a) != student_fingerprint("other", a)
