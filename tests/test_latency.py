"""Latency and memory as measured objectives: the evaluator, the lookup table, budgets, the
re-measured front, and a search with --max-latency-ms end to end, on tiny random models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from cli_helpers import SMALL, assert_ok, run_cli

from autocomp.errors import BudgetError, StudyError
from autocomp.latency.timing import LatencyResult, Timing, measure_latency, resident_bytes
from autocomp.latency.spec import LatencySpec
from autocomp.inputs.models import load_model
from autocomp.config.objectives import Budgets
from autocomp.config.plan import CompressionPlan, LayerPlan
from autocomp.inputs.targets import find_targets

FAST = LatencySpec(prompt_len=16, new_tokens=4, repeats=3, warmup=1, threads=1)


# ---- the evaluator -------------------------------------------------------------------------------


def test_timing_median_and_spread():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.min, t.max, t.n) == (3.0, 1.0, 5.0, 5)
    assert t.q1 == 2.0 and t.q3 == 4.0
    assert t.iqr_pct == pytest.approx(100 * 2.0 / 3.0)
    assert Timing.of([7.0]).median == 7.0
    with pytest.raises(ValueError):
        Timing.of([])


def test_measure_latency_figures_are_positive_and_settings_recorded(llama):
    threads_before = torch.get_num_threads()
    result = measure_latency(llama.model, FAST)
    assert torch.get_num_threads() == threads_before  # restored
    for timing in (result.prefill, result.decode):
        assert timing.n == FAST.repeats
        assert 0 < timing.min <= timing.median <= timing.max
        assert math.isfinite(timing.iqr_pct)
    s = result.settings
    assert s["device"] == "cpu" and s["threads"] == 1 and s["dtype"] == "float32"
    assert (s["batch"], s["prompt_len"], s["new_tokens"], s["repeats"], s["warmup"]) == (1, 16, 4, 3, 1)
    assert s["torch"] == torch.__version__ and s["cpu_capability"]
    assert result.model_mb == pytest.approx(resident_bytes(llama.model) / 1e6)
    assert result.peak_mb >= result.model_mb and result.work_mb >= 0
    m = result.metrics("decode")
    assert m["latency_ms"] == result.decode.median and m["prefill_ms"] == result.prefill.median
    assert result.metrics("prefill")["latency_ms"] == result.prefill.median
    assert json.loads(json.dumps(result.to_dict()))["settings"]["device"] == "cpu"


def test_resident_bytes_counts_shared_storage_once(tiny_models):
    gemma = load_model(str(tiny_models["gemma3"])).model  # tied embedding / LM head
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in gemma.parameters()}
    buffers = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in gemma.buffers()}
    assert resident_bytes(gemma) == sum((unique | buffers).values())
    head = gemma.get_output_embeddings().weight
    assert head.untyped_storage().data_ptr() == gemma.get_input_embeddings().weight.untyped_storage().data_ptr()
    untied = copy.deepcopy(gemma)
    untied.lm_head.weight = torch.nn.Parameter(head.detach().clone())
    assert resident_bytes(untied) == resident_bytes(gemma) + head.numel() * head.element_size()  # tied: once


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "tpu"}, ["device", "cpu"]),
    ({"dtype": "int8"}, ["dtype", "float32"]),
    ({"metric": "ttft"}, ["metric", "decode"]),
    ({"repeats": 0}, ["repeats", "positive"]),
    ({"prompt_len": 1.5}, ["prompt_len"]),
    ({"margin": -1}, ["margin"]),
    ({"engine": "onnx"}, ["engine", "torch", "llamacpp"]),
    ({"engine": "llamacpp", "device": "cuda"}, ["llamacpp", "--latency-device cpu"]),
    ({"engine": "llamacpp", "batch": 2}, ["llamacpp", "--latency-batch 1"]),
])
def test_latency_spec_refuses_bad_settings(kwargs, words):
    with pytest.raises(BudgetError) as err:
        LatencySpec(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_cuda_is_refused_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BudgetError, match="no CUDA device"):
        LatencySpec(device="cuda").check_device()


# ---- budgets and the study spec ------------------------------------------------------------------


def test_latency_budgets_become_constraints():
    b = Budgets(max_latency_ms=20.0, max_memory_mb=300.0)
    assert b.needs_latency and "latency <= 20 ms" in b.describe()
    c = b.constraints({"perplexity": 10.0, "size_mb": 1.0, "latency_ms": 25.0, "memory_mb": 250.0}, 10.0)
    assert c == {"latency_ms": 5.0, "memory_mb": -50.0}
    assert not b.feasible({"latency_ms": 25.0, "memory_mb": 250.0}, 10.0)
    assert b.feasible({"latency_ms": 19.0, "memory_mb": 250.0}, 10.0)
    assert b.constraints({"perplexity": 10.0}, 10.0)["latency_ms"] > 0  # unmeasured: infeasible
    with pytest.raises(BudgetError, match="max-latency-ms"):
        Budgets(max_latency_ms=0)
    with pytest.raises(BudgetError, match="max-memory-mb"):
        Budgets(max_memory_mb=-1)


def test_old_specs_keep_their_hash():
    """Unset latency settings are left out of the stored spec, so existing studies resume unchanged."""
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec

    spec = StudySpec(model="m", space=SearchSpace.load("bits"), budgets=Budgets(max_size_mb=5))
    data = spec.to_dict()
    assert set(data["budgets"]) == {"max_ppl_increase_pct", "max_size_mb", "max_kl"}
    digest = spec.digest()
    timed = StudySpec(model="m", space=SearchSpace.load("bits"), budgets=Budgets(max_size_mb=5, max_latency_ms=9),
                      latency=FAST)
    assert timed.digest() != digest
    again = StudySpec.from_dict(json.loads(json.dumps(timed.to_dict())))
    assert again.latency == FAST and again.budgets.max_latency_ms == 9 and again.digest() == timed.digest()
    assert "engine" not in timed.to_dict()["latency"]     # the default engine: stored as before engines existed
    old = timed.to_dict()
    assert StudySpec.from_dict(old).latency.engine == "torch"
    gguf = StudySpec(model="m", space=SearchSpace.load("llamacpp"), budgets=Budgets(max_latency_ms=9),
                     latency=LatencySpec(engine="llamacpp"))
    assert StudySpec.from_dict(json.loads(json.dumps(gguf.to_dict()))).latency.engine == "llamacpp"
    with pytest.raises(StudyError, match="deploy_target: llamacpp"):
        StudySpec(model="m", space=SearchSpace.load("bits"), budgets=Budgets(max_latency_ms=9),
                  latency=LatencySpec(engine="llamacpp"))
    with pytest.raises(StudyError, match="latency measurement settings"):
        StudySpec(model="m", space=SearchSpace.load("bits"), budgets=Budgets(max_latency_ms=9))
    with pytest.raises(StudyError, match="latency_ms"):
        StudySpec(model="m", space=SearchSpace.load("bits"), objectives=("perplexity", "latency_ms"))


# ---- the lookup table ----------------------------------------------------------------------------


def test_table_is_measured_once_and_kept_on_disk(tmp_path):
    from autocomp.latency.table import LatencyTable

    table = LatencyTable(FAST, tmp_path)
    int4 = LayerPlan(method="rtn", bits=4, group_size=32)
    first = table.layer_ms(int4, 96, 128, 1)
    dense = table.layer_ms(LayerPlan(), 96, 128, 1)
    three = table.layer_ms(LayerPlan(method="rtn", bits=3, group_size=32), 96, 128, 1)
    assert first > 0 and dense > 0
    assert three == dense  # no 3-bit kernel on CPU: it runs as the dense float layer, and is timed so
    assert table.measured == 2
    table.save()
    again = LatencyTable(FAST, tmp_path)
    assert again.layer_ms(int4, 96, 128, 1) == first and again.measured == 0
    other = LatencyTable(LatencySpec(threads=2, prompt_len=16, new_tokens=4), tmp_path)
    assert other.path != table.path  # another thread count is another table


def test_table_prediction_of_the_dense_model_is_its_measurement(llama, tmp_path):
    from autocomp.latency.table import LatencyModel, LatencyTable

    targets = find_targets(llama.model)
    table = LatencyTable(FAST, tmp_path)
    dense = measure_latency(llama.model, FAST)
    model = LatencyModel.fit(table, targets, 2, dense.prefill.median, dense.decode.median)
    pred = model.predict(targets, {}, 2)
    assert pred.decode_ms == pytest.approx(dense.decode.median)
    assert pred.prefill_ms == pytest.approx(dense.prefill.median)
    # fewer blocks predict less time
    assert model.predict(targets[: len(targets) // 2], {}, 1).decode_ms < pred.decode_ms


# ---- the re-measured front -----------------------------------------------------------------------


def _fake_result(ms: float) -> LatencyResult:
    t = Timing.of([ms])
    return LatencyResult(t, t, 1.0, 0.5, 1.5, {"device": "cpu"})


class _FakeEvaluator:
    """Stands in for a TrialEvaluator: remembers the plan it was asked to build."""

    def __init__(self):
        self.built = []
        self.plan = None

    def compress_plan(self, plan):
        self.plan = plan
        self.built.append(plan.default.bits)

    def compress(self, per_layer, student=None):
        self.plan = None

    def remeasured_latency(self):
        from autocomp.latency.trial import remeasure_entry

        return remeasure_entry(None, [], {}, {"bits": self.plan.default.bits}, FAST)


def test_front_is_remeasured_until_every_member_meets_the_budget(tmp_path, monkeypatch):
    """A candidate whose re-measured latency breaks the budget leaves the front; the candidate it
    was hiding enters and is measured in turn; the infeasible one is never re-measured."""
    import optuna

    import autocomp.latency.trial as measure
    from autocomp import api
    from autocomp.store.records import load_records
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.store.schema import DENSE_ATTR, HASH_ATTR, SPEC_ATTR

    spec = StudySpec(model="m", space=SearchSpace.load("bits"), budgets=Budgets(max_latency_ms=10.0), latency=FAST)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url, directions=["minimize", "minimize"])
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    study.set_user_attr(HASH_ATTR, spec.digest())
    study.set_user_attr(DENSE_ATTR, {"perplexity": 7.0, "size_mb": 20.0, "size_bytes": 20_000_000})
    #           bits: (ppl, size, search latency, re-measured latency)
    trials = {2: (10.0, 4.0, 8.0, 12.0), 3: (11.0, 5.0, 9.0, 9.5), 4: (9.0, 8.0, 5.0, 6.0), 5: (8.0, 9.0, 20.0, 1.0)}
    for bits, (ppl, size, lat, _) in trials.items():
        plan = {"version": 1, "default": {"method": "rtn", "bits": bits}, "layers": {}, "embeddings": False}
        metrics = {"perplexity": ppl, "size_mb": size, "latency_ms": lat, "latency_predicted_ms": lat * 1.1}
        study.add_trial(optuna.trial.create_trial(
            values=[ppl, size], params={}, distributions={}, user_attrs={"metrics": metrics, "plan": plan},
            system_attrs={"constraints": [lat - 10.0]}))
    monkeypatch.setattr(measure, "measure_deployed",
                        lambda model, targets, compressed, plans, spec: (_fake_result(trials[plans["bits"]][3]), _Report()))
    fake = _FakeEvaluator()
    messages = []
    outcome = api.remeasure(url, "s", echo=messages.append, evaluator=fake)
    assert fake.built == [2, 4, 3]  # the front by size, then the candidate the dropped one hid
    front = api.pareto(url, "s")
    assert [r.metrics["perplexity"] for r in front] == [11.0, 9.0]
    assert all(r.metrics["latency_remeasured"] == 1.0 and r.metrics["latency_ms"] <= 10.0 for r in front)
    records = {r.metrics["perplexity"]: r for r in load_records(url, "s").records}
    assert records[10.0].metrics["latency_ms"] == 12.0 and records[10.0].metrics["latency_ms_search"] == 8.0
    assert len(outcome.table_errors_pct) == 3
    assert any("prediction error" in m for m in messages + [outcome.table_error_summary])
    # run again: nothing left to measure
    fake.built.clear()
    api.remeasure(url, "s", echo=messages.append, evaluator=fake)
    assert fake.built == []


class _Report:
    """A materialize report with no layers."""

    kernel_layers: list = []
    no_kernel: dict = {}

    def reasons(self):
        return {}


# ---- a search with a latency budget, end to end --------------------------------------------------

LATENCY_SPACE = {
    "name": "latency-students",
    "granularity": "role",
    "quantization": {"methods": ["rtn"], "bits": [4, 8, 16], "group_size": [32]},
    "student": {"layers": [1.0, 0.25], "ffn": [1.0], "distill": {"steps": [0]}},
}
LATENCY_FLAGS = ["--latency-threads", "1", "--latency-prompt-len", "16", "--latency-new-tokens", "8",
                 "--latency-repeats", "5"]


@pytest.fixture(scope="module")
def deep_llama(tiny_root):
    """A tiny Llama with 8 blocks: a 2-block student is clearly faster per token."""
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_root / "llama-deep"
    if not out.exists():
        tok = AutoTokenizer.from_pretrained(tiny_root / "tokenizer")
        config = tiny_config("llama", len(tok))
        config.num_hidden_layers = 8
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def test_search_with_a_latency_budget_returns_only_configurations_that_meet_it(deep_llama, tmp_path, cache_dir):
    import optuna
    import yaml

    dense = measure_latency(load_model(str(deep_llama)).model,
                            LatencySpec(threads=1, prompt_len=16, new_tokens=8, repeats=5))
    budget = round(0.7 * dense.decode.median, 4)   # the full-depth models cannot meet it; 2-block students can
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(LATENCY_SPACE))
    url = f"sqlite:///{tmp_path / 'lat.db'}"
    proc = run_cli(["search", "--model", deep_llama, "--space", space_file, "--trials", 8, "--storage", url,
                    "--study-name", "lat", "--max-latency-ms", budget, *LATENCY_FLAGS, *SMALL, "--no-validate"],
                   tmp_path, cache_dir)
    assert_ok(proc)
    assert "prediction error" in proc.stderr and "re-measured" in proc.stderr
    study = optuna.load_study(study_name="lat", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 8
    for t in done:
        m = t.user_attrs["metrics"]
        assert m["latency_ms"] > 0 and m["latency_predicted_ms"] > 0 and m["memory_mb"] > 0
        if m["latency_measured"]:
            compressed = CompressionPlan.from_dict(t.user_attrs["plan"]).layers   # an explicit plan names only these
            assert math.isfinite(m["latency_table_error_pct"])
            assert m["kernel_layers"] + m["no_kernel_layers"] == len(compressed), (m, len(compressed))
    front = json.loads(run_cli(["pareto", "--storage", url, "--study-name", "lat", "--json"], tmp_path, cache_dir).stdout)
    assert front, "a 2-block student meets the budget"
    remeasured = study.user_attrs["autocomp_remeasured"]
    for row in front:  # every returned configuration was re-measured, and its re-measured latency meets the budget
        assert str(row["trial"]) in remeasured
        assert remeasured[str(row["trial"])]["latency_ms"] <= budget
        assert row["metrics"]["latency_ms"] == remeasured[str(row["trial"])]["latency_ms"]
        assert row["plan"].get("student", {}).get("layers") == 2
    # the full-depth configurations were judged on their latency (measured or predicted) and left out
    deep = [t for t in done if not t.user_attrs["plan"].get("student")]
    assert deep and all(t.number not in {r["trial"] for r in front} for t in deep)
    rec = run_cli(["recommend", "--storage", url, "--study-name", "lat"], tmp_path, cache_dir)
    assert_ok(rec)
    assert "latency" in rec.stdout


def test_validated_recommendation_respects_the_latency_budget():
    """Held-out verdicts keep the latency and memory budgets: a fast-enough held-out perplexity does not
    make a slow configuration feasible."""
    from autocomp.store.records import TrialRecord
    from autocomp.validation.verdicts import verdict

    held = {"perplexity": 10.0, "ppl_increase_pct": 0.0, "ppl_increase_ci": [0.0, 0.0], "kl": 0.0, "kl_ci": [0.0, 0.0]}
    entry = {"sets": {"heldout": held}}
    budgets = Budgets(max_ppl_increase_pct=5, max_latency_ms=60, max_memory_mb=500)
    slow = TrialRecord(2, {"perplexity": 10.0, "size_mb": 1.0, "latency_ms": 128.0, "memory_mb": 100.0}, {})
    fast = TrialRecord(4, {"perplexity": 10.0, "size_mb": 1.0, "latency_ms": 47.0, "memory_mb": 100.0,
                           "latency_remeasured": 1.0}, {})
    big = TrialRecord(5, {"perplexity": 10.0, "size_mb": 1.0, "latency_ms": 47.0, "memory_mb": 900.0}, {})
    v = verdict(slow, entry, {}, budgets, dense_search_ppl=10.0)
    assert not v["heldout_feasible"] and "latency 128 ms (as searched) is over the 60 ms budget" in v["reasons"]
    assert verdict(fast, entry, {}, budgets, dense_search_ppl=10.0)["heldout_feasible"]
    assert "memory 900 MB" in verdict(big, entry, {}, budgets, dense_search_ppl=10.0)["reasons"][0]


def test_latency_as_an_objective(tiny_models, tmp_path, cache_dir):
    """``latency_ms`` as a third objective: every trial carries it, the front is non-dominated in it, and
    the front is re-measured at the end although no latency budget is set."""
    import optuna

    url = f"sqlite:///{tmp_path / 'obj.db'}"
    proc = run_cli(["search", "--model", tiny_models["llama"], "--space", "demo", "--trials", 5, "--storage", url,
                    "--study-name", "obj", "--objectives", "perplexity,size_mb,latency_ms", *LATENCY_FLAGS, *SMALL,
                    "--no-validate"], tmp_path, cache_dir)
    assert_ok(proc)
    study = optuna.load_study(study_name="obj", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5 and all(len(t.values) == 3 and t.values[2] == t.user_attrs["metrics"]["latency_ms"]
                                  for t in done)
    assert all(t.user_attrs["metrics"]["latency_measured"] == 1.0 for t in done)  # no budget: nothing is hopeless
    front = json.loads(run_cli(["pareto", "--storage", url, "--study-name", "obj", "--json"], tmp_path, cache_dir).stdout)
    assert front and all(str(r["trial"]) in study.user_attrs["autocomp_remeasured"] for r in front)


# ---- the llamacpp engine's prediction (no llama.cpp needed) --------------------------------------


def test_llamacpp_prediction_is_fitted_per_gguf_type():
    """Proportional to bytes where nothing was measured; fitted per type from measurements: a slow
    type (Q5_0 here, as measured on gemma3-270m) does not make a fast one (Q4_0) look slow."""
    from autocomp.llamacpp.latency import BytesModel

    def truth(x):   # ms: 1 of overhead, then per MB of each type
        return 1.0 + 10.0 * x.get("F16", 0) / 1e6 + 4.0 * x.get("Q4_0", 0) / 1e6 + 12.0 * x.get("Q5_0", 0) / 1e6

    dense = {"F16": 2e6}
    model = BytesModel(2e6, truth(dense))
    assert model({"F16": 1e6}) == pytest.approx(truth(dense) / 2)         # nothing but the dense point yet
    model.add(dense, truth(dense))
    q4 = {"Q4_0": 0.56e6}
    assert model(q4) == pytest.approx(truth(dense) * 0.56e6 / 2e6, rel=0.05)   # Q4_0 unmeasured: proportional
    for point in ({"Q5_0": 0.69e6}, {"Q4_0": 0.56e6}, {"Q4_0": 0.3e6, "Q5_0": 0.3e6}, {"F16": 1e6, "Q4_0": 0.28e6}):
        model.add(point, truth(point))
    for mix in ({"Q4_0": 0.4e6, "Q5_0": 0.2e6}, {"F16": 0.5e6, "Q5_0": 0.4e6}, {"Q5_0": 0.69e6}):
        assert model(mix) == pytest.approx(truth(mix), rel=0.02), mix
    bytes_only = BytesModel(2e6, truth(dense))
    for point in (dense, {"Q5_0": 0.69e6}, {"Q4_0": 0.56e6}):
        bytes_only.add({"bytes": sum(point.values())}, truth(point))
    # one coefficient for all bytes cannot hold both types: what the per-type fit is for
    assert abs(bytes_only({"bytes": 0.69e6}) - truth({"Q5_0": 0.69e6})) > 0.1 * truth({"Q5_0": 0.69e6})
