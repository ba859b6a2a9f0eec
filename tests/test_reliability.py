"""Reliability under hostile input (issue 16), unit level: corrupted or foreign variant-cache files,
non-finite models and stored values, the cache folder's ownership, secrets in URLs, study names,
truncated weights, window lengths, YAML errors.

The end-to-end table of bad command lines is tests/test_hostile.py.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from autocomp.config.plan import LayerPlan
from autocomp.errors import AutocompError


# ---- 1. variant cache: integrity digest and foreign entries ---------------------------------------

def _quantized(out_features: int = 8, in_features: int = 32, seed: int = 0):
    from autocomp.pipeline.layer import compress_weight

    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    return weight, compress_weight(weight, LayerPlan(method="rtn", bits=4, group_size=16))


def _flip_one_bit(path: Path, tensor: str) -> None:
    """Flip the lowest bit of the first byte of ``tensor``'s data, leaving the header valid."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0]
    raw[start] ^= 1
    path.write_bytes(bytes(raw))


def test_a_corrupted_cache_entry_is_detected_recomputed_and_reported(tmp_path, caplog):
    from autocomp.pipeline.variants import LayerVariantCache

    _, cw = _quantized()
    LayerVariantCache(directory=tmp_path).get_compressed("ab" + "0" * 62, lambda: cw)
    path = tmp_path / "ab" / ("ab" + "0" * 62 + ".safetensors")
    assert path.exists()
    _flip_one_bit(path, "scales")

    calls = []

    def compute():
        calls.append(1)
        return cw

    cache = LayerVariantCache(directory=tmp_path)
    with caplog.at_level(logging.WARNING):
        got = cache.get_or_compute("ab" + "0" * 62, compute)
    assert torch.equal(got, cw.weight), "a corrupted entry must not be used"
    assert calls == [1] and cache.bad_entries == 1
    assert any("1 bad" in r.getMessage() and "recomputed" in r.getMessage() for r in caplog.records), caplog.text
    # the entry was rewritten: the next process reads it without recomputing
    again = LayerVariantCache(directory=tmp_path)
    assert torch.equal(again.get_or_compute("ab" + "0" * 62, compute), cw.weight)
    assert calls == [1] and again.bad_entries == 0 and again.disk_hits == 1


def test_a_cache_entry_of_the_wrong_shape_is_foreign_and_recomputed(tmp_path):
    """A valid file of another shape or dtype under a layer's key (a copied-in folder, a key clash) is not used."""
    from autocomp.pipeline.variants import LayerVariantCache

    key = "cd" + "1" * 62
    _, foreign = _quantized(out_features=3, in_features=16)
    LayerVariantCache(directory=tmp_path).get_compressed(key, lambda: foreign)
    _, own = _quantized(out_features=8, in_features=32)
    cache = LayerVariantCache(directory=tmp_path)
    got = cache.get_or_compute(key, lambda: own, expect=((8, 32), torch.float32))
    assert torch.equal(got, own.weight) and cache.bad_entries == 1
    half = LayerVariantCache(directory=tmp_path)
    cw = half.get_compressed(key, lambda: own, expect=((8, 32), torch.float16))
    assert cw.weight.dtype == torch.float32 and half.bad_entries == 1   # recomputed: the stored one is float32


def test_the_stitcher_checks_the_shape_of_cached_variants(tmp_path, tiny_models, monkeypatch):
    from autocomp.inputs.models import load_model
    from autocomp.inputs.targets import find_targets
    from autocomp.pipeline import stitch
    from autocomp.pipeline.layer import compress_weight
    from autocomp.pipeline.variants import LayerVariantCache

    loaded = load_model(str(tiny_models["gpt2"]))
    targets = find_targets(loaded.model)
    target = targets[1]
    plan = LayerPlan(method="rtn", bits=4, group_size=16)
    monkeypatch.setattr(stitch, "compressor_needs_calibration", lambda method: True)  # persist rtn too
    key = LayerVariantCache.key(loaded.fingerprint, target.name, plan, None)
    _, foreign = _quantized(out_features=3, in_features=16)
    LayerVariantCache(directory=tmp_path).get_compressed(key, lambda: foreign)

    cache = LayerVariantCache(directory=tmp_path)
    stitcher = stitch.ModelStitcher(loaded.model, targets, loaded.fingerprint, cache=cache)
    dense = stitcher.dense_weight(target.name).clone()
    assert stitcher.apply({target.name: plan}) == 1           # no shape error: the foreign file is ignored
    assert cache.bad_entries == 1
    expected = compress_weight(dense, plan).weight
    assert torch.equal(stitcher.variant(target.name, plan), expected)


def test_every_cached_tensor_file_is_checked_before_use(tmp_path, caplog):
    """The same class of fault beyond the variant cache: a corrupted cached file (teacher top-k, dense
    reference) is recomputed, not used."""
    from autocomp.cachefile import cached_tensors

    path = tmp_path / "ref.safetensors"
    good = {"logits": torch.arange(12, dtype=torch.float32).reshape(3, 4), "indices": torch.arange(3)}
    assert torch.equal(cached_tensors(path, lambda: good, "x")["logits"], good["logits"])
    _flip_one_bit(path, "logits")
    with caplog.at_level(logging.WARNING):
        again = cached_tensors(path, lambda: good, "x")
    assert torch.equal(again["logits"], good["logits"]) and "integrity" in caplog.text


def test_a_corrupted_cached_student_is_rebuilt(tiny_models, tmp_path):
    from autocomp.inputs.models import load_model
    from autocomp.students.build import build_student
    from autocomp.students.spec import DistillSpec, StudentSpec

    loaded = load_model(str(tiny_models["llama"]))
    spec = StudentSpec(layers=1, ffn=64, distill=DistillSpec(steps=2, batch=4, seq_len=64, windows=8, lr=1e-3))
    first = build_student(loaded, spec, cache_dir=tmp_path, progress=False)
    weights = next(tmp_path.glob("*/model.safetensors"))
    raw = weights.read_bytes()
    names = set(json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])) - {"__metadata__"}
    _flip_one_bit(weights, sorted(names)[0])
    again = build_student(loaded, spec, cache_dir=tmp_path, progress=False)
    assert not again.from_cache
    a, b = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 1. validation: a stored score that the rebuilt model does not reproduce ---------------------

def _records(metrics_by_trial: dict[int, dict], budgets=None):
    from autocomp.config.objectives import Budgets
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.store.records import StudyRecords, TrialRecord

    spec = StudySpec(model="m", space=SearchSpace.load("bits"), budgets=budgets or Budgets())
    records = [TrialRecord(n, dict(m), {}) for n, m in metrics_by_trial.items()]
    return StudyRecords("s", spec, {"perplexity": 10.0, "size_mb": 1.0}, records, 0, 0)


def _entry(ppl: float, rel: float | None) -> dict:
    figures = {"perplexity": ppl, "ppl_increase_pct": 100 * (ppl / 10 - 1), "ppl_increase_ci": [0.0, 0.5],
               "kl": 0.01, "kl_ci": [0.0, 0.02]}
    entry = {"size_mb": 0.5, "sets": {"search": dict(figures), "heldout": dict(figures)}, "tasks": {}}
    if rel is not None:
        entry["search_reproduced_rel"] = rel
    return entry


def test_a_trial_whose_search_score_is_not_reproduced_is_never_recommended():
    from autocomp.validation.verdicts import recommend_validated, verdicts

    study = _records({0: {"perplexity": 10.1, "size_mb": 0.4, "kl": 0.01},      # smallest: the pick unless refused
                      1: {"perplexity": 10.1, "size_mb": 0.6, "kl": 0.01}})
    validation = {"dense": {"sets": {}, "tasks": {}}, "acc_budgets": {},
                  "trials": {"0": _entry(10.1, 0.5), "1": _entry(10.1, 0.0)}}
    judged = verdicts(study, validation)
    assert judged[0]["reproduced"] is False and not judged[0]["heldout_feasible"]
    assert "not reproduced" in judged[0]["reasons"][0]
    assert judged[1]["reproduced"] is True and judged[1]["heldout_feasible"]
    best, _ = recommend_validated(study, validation)
    assert best is not None and best.trial == 1


# ---- 2. non-finite values: readers, JSON, dense model, trials ------------------------------------

def test_readers_cope_with_non_finite_stored_metrics():
    from autocomp.config.objectives import Budgets
    from autocomp.front import pareto_front, recommend
    from autocomp.validation.verdicts import recommend_validated

    study = _records({0: {"perplexity": math.inf, "size_mb": 0.3, "kl": math.nan},
                      1: {"perplexity": None, "size_mb": 0.35, "kl": None},
                      2: {"perplexity": 10.2, "size_mb": 0.5, "kl": 0.02}})
    for budgets in (Budgets(), Budgets(max_ppl_increase_pct=5), Budgets(max_size_mb=1)):
        front = pareto_front(study, budgets)
        assert [r.trial for r in front] == [2], budgets
        for prefer in ("auto", "size", "quality", "knee"):
            assert recommend(study, budgets, prefer).trial == 2
    validation = {"dense": {"sets": {}, "tasks": {}}, "acc_budgets": {},
                  "trials": {"0": _entry(10.2, 0.0), "2": _entry(10.2, 0.0)}}
    validation["trials"]["0"]["sets"]["heldout"].update(perplexity=None, ppl_increase_pct=None, kl=None)
    best, judged = recommend_validated(study, validation, Budgets(max_ppl_increase_pct=5))
    assert best.trial == 2 and not judged[0]["heldout_feasible"]


def test_trial_records_serialise_to_strict_json():
    from autocomp.store.records import TrialRecord

    record = TrialRecord(0, {"perplexity": math.inf, "kl": math.nan, "size_mb": 1.0}, {})
    text = json.dumps(record.to_dict(), allow_nan=False)
    assert json.loads(text)["metrics"] == {"perplexity": None, "kl": None, "size_mb": 1.0}


def test_a_model_with_a_nan_weight_is_refused_on_load(tiny_models, tmp_path):
    from tiny import copy_with_nan_weight

    from autocomp.errors import ModelLoadError
    from autocomp.inputs.models import load_model

    folder = tmp_path / "nan-model"
    copy_with_nan_weight(tiny_models["llama"], folder)
    with pytest.raises(ModelLoadError, match="non-finite") as info:
        load_model(str(folder))
    assert "down_proj" in str(info.value)


def test_a_non_finite_dense_score_stops_before_the_first_trial(tiny_models, tmp_path):
    from autocomp.errors import ModelLoadError
    from autocomp.study.evaluate import DenseMetrics
    from autocomp.study.local import run_local
    from test_study import _spec

    class NanDense:
        def __init__(self, spec):
            from autocomp.study.evaluate import TrialEvaluator

            self._inner = TrialEvaluator(spec)
            self.dense = DenseMetrics(math.nan, self._inner.dense.size_mb, self._inner.dense.size_bytes)
            self.calls = 0

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def evaluate(self, *args, **kwargs):
            self.calls += 1
            return self._inner.evaluate(*args, **kwargs)

    import optuna

    url = f"sqlite:///{tmp_path}/study.db"
    made = []
    with pytest.raises(ModelLoadError, match="dense model"):
        run_local(_spec(tiny_models["llama"]), url, "nan", 3, progress=False, echo=lambda m: None,
                  evaluator_factory=lambda s: made.append(NanDense(s)) or made[-1])
    assert made[0].calls == 0
    assert optuna.get_all_study_names(url) == []


def test_a_trial_with_a_non_finite_score_is_a_failed_trial(tiny_models, tmp_path):
    import optuna

    from autocomp.study.local import run_local
    from test_study import _spec

    class NanOnSecond:
        def __init__(self, spec):
            from autocomp.study.evaluate import TrialEvaluator

            self._inner = TrialEvaluator(spec)
            self.calls = 0

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def evaluate(self, *args, **kwargs):
            self.calls += 1
            metrics = self._inner.evaluate(*args, **kwargs)
            if self.calls == 2:
                metrics.update(perplexity=math.inf, kl=math.nan)
            return metrics

    url = f"sqlite:///{tmp_path}/study.db"
    outcome = run_local(_spec(tiny_models["llama"]), url, "nan", 3, progress=False, echo=lambda m: None,
                        evaluator_factory=NanOnSecond)
    assert outcome.failed == 1
    trials = optuna.load_study(study_name="nan", storage=url).get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "non-finite" in failed[0].user_attrs["fail_reason"]
    assert all(math.isfinite(t.user_attrs["metrics"]["perplexity"])
               for t in trials if t.state == optuna.trial.TrialState.COMPLETE)


# ---- 3. the cache command deletes only what the cache wrote --------------------------------------

def test_pruning_refuses_a_folder_the_cache_did_not_write(tmp_path):
    from safetensors.torch import save_file

    from autocomp.api import variant_cache_usage
    from autocomp.errors import StorageError

    models = tmp_path / "hf-models"
    (models / "my-model").mkdir(parents=True)
    save_file({"w": torch.zeros(100)}, str(models / "my-model" / "model.safetensors"))
    with pytest.raises(StorageError, match="not a variant cache"):
        variant_cache_usage(models, max_bytes=0)
    assert (models / "my-model" / "model.safetensors").exists()


def test_pruning_a_cache_folder_deletes_only_its_own_entries(tmp_path):
    from safetensors.torch import save_file

    from autocomp.api import variant_cache_usage
    from autocomp.pipeline.variants import LayerVariantCache

    folder = tmp_path / "variants"
    _, cw = _quantized()
    cache = LayerVariantCache(directory=folder)
    for i in range(3):
        cache.get_compressed(f"{i:02d}" + "a" * 62, lambda: cw)
    (folder / "zz").mkdir()
    save_file({"w": torch.zeros(10)}, str(folder / "zz" / "model.safetensors"))   # not the cache's naming
    usage = variant_cache_usage(folder, max_bytes=0)
    assert (usage.variants, usage.removed) == (3, 3)
    assert (folder / "zz" / "model.safetensors").exists()


# ---- 4. secrets in storage URLs ------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "postgresql://user:s3cr3tpw@host/db",
    "postgresql://:s3cr3tpw@host/db",
    "postgresql://user@host/db?password=s3cr3tpw",
    "postgresql://user@host/db?sslmode=require&password=s3cr3tpw",
    "postgresql+psycopg2://user:s3cr3tpw@host:5432/db?sslmode=require",
    "mysql://user:s3%40cr3tpw@host/db",
    "postgresql://user:s3:cr3tpw@host/db",
    "postgresql://user@host/db?sslpassword=s3cr3tpw",
    "postgresql://user@host/db?token=s3cr3tpw",
    "postgresql://user@host/db?api_key=s3cr3tpw",
    "foo://user:s3cr3tpw@host/db",
    "postgresql://user:s3cr3tpw@",
])
def test_mask_url_hides_every_form_of_secret(url):
    from autocomp.store.urls import mask_url

    shown = mask_url(url)
    assert "s3cr3tpw" not in shown and "cr3tpw" not in shown, shown
    assert "***" in shown


def test_mask_url_keeps_what_is_not_secret():
    from autocomp.store.urls import mask_url

    assert mask_url("sqlite:///results/s/study.db") == "sqlite:///results/s/study.db"
    shown = mask_url("postgresql://user:pw@host:5432/db?sslmode=require")
    assert "user" in shown and "host:5432/db" in shown and "sslmode=require" in shown


@pytest.mark.parametrize("url", ["foo://u:s3cr3tpw@h/db", "postgresql://:s3cr3tpw@127.0.0.1:1/db",
                                 "postgresql://u@127.0.0.1:1/db?password=s3cr3tpw"])
def test_storage_errors_never_show_the_password(url):
    from autocomp.errors import StorageError
    from autocomp.store.urls import open_storage

    with pytest.raises(AutocompError) as info:
        open_storage(url)
    assert isinstance(info.value, StorageError) or "driver" in str(info.value)
    assert "s3cr3tpw" not in str(info.value)


# ---- 6. study names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../../escape", "", "a/b", ".hidden", "a\\b", "..", "with space", "a\nb"])
def test_unsafe_study_names_are_refused(name, tmp_path, monkeypatch):
    from autocomp.errors import StudyError
    from autocomp.store.urls import check_study_name, default_storage_url

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StudyError, match="study name"):
        check_study_name(name)
    with pytest.raises(StudyError, match="study name"):
        default_storage_url(name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["s", "bits-demo", "mixed-gemma3-270m", "a.b_c-1"])
def test_safe_study_names_pass(name):
    from autocomp.store.urls import check_study_name

    assert check_study_name(name) == name


def test_the_default_study_name_is_always_safe():
    from autocomp.api import default_study_name
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.store.urls import check_study_name

    for model in ("./my model", "/abs/.hidden", "org/model name", "x.gguf", "/"):
        check_study_name(default_study_name(StudySpec(model=model, space=SearchSpace.load("bits"))))


# ---- 7. truncated weights ------------------------------------------------------------------------

def test_a_truncated_weights_file_is_a_named_error(tiny_models, tmp_path):
    from autocomp.errors import ModelLoadError
    from autocomp.inputs.models import load_model

    folder = tmp_path / "truncated"
    shutil.copytree(tiny_models["llama"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors|truncated|cannot load"):
        load_model(str(folder))


# ---- 8. window lengths against the model's positions ---------------------------------------------

def test_windows_longer_than_the_model_positions_are_refused(tiny_models):
    from autocomp.errors import DataError
    from autocomp.inputs.data import check_window_lengths
    from autocomp.inputs.models import max_positions
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["gpt2"])
    assert max_positions(config) == 256
    check_window_lengths({"--eval-seq-len": 256}, config)
    with pytest.raises(DataError, match="--eval-seq-len 100000.*256"):
        check_window_lengths({"--eval-seq-len": 100000}, config)


# ---- 10. YAML syntax errors, negative cache sizes ------------------------------------------------

def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    from autocomp.config.space import SearchSpace
    from autocomp.errors import SpaceError

    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nsparsity:\n  levels: [0.0, 0.5\n  methods: [magnitude]\n")
    with pytest.raises(SpaceError) as info:
        SearchSpace.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert f"{path}:" in message and "line 3" in message and "column" in message


def test_a_negative_memory_cache_is_refused():
    from autocomp.errors import StorageError
    from autocomp.pipeline.variants import LayerVariantCache

    with pytest.raises(StorageError, match="--cache-mb"):
        LayerVariantCache(max_bytes=-5 << 20)


# ---- 5. custom model code runs only on the word of the command, not of the storage --------------

@pytest.fixture(scope="module")
def remote_code_study(tiny_models, tmp_path_factory):
    """A finished 2-trial study whose stored spec says trust_remote_code (as a shared storage could)."""
    from dataclasses import replace

    from autocomp.study.local import run_local
    from test_study import _spec

    folder = tmp_path_factory.mktemp("remote-code")
    url = f"sqlite:///{folder}/study.db"
    run_local(replace(_spec(tiny_models["llama"]), trust_remote_code=True), url, "rc", 2, progress=False,
              echo=lambda m: None)
    return url


def _trials(url: str, name: str):
    import optuna

    return [(t.number, t.state) for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)]


def test_a_worker_without_the_flag_refuses_a_study_that_runs_model_code(remote_code_study):
    from autocomp.errors import StudyError
    from autocomp.study.worker import run_worker

    before = _trials(remote_code_study, "rc")
    with pytest.raises(StudyError, match="--trust-remote-code"):
        run_worker(remote_code_study, "rc", 3, progress=False, echo=lambda m: None)
    assert _trials(remote_code_study, "rc") == before


def test_validate_and_measure_without_the_flag_refuse_a_study_that_runs_model_code(remote_code_study):
    from autocomp.errors import StudyError
    from autocomp.validation.runner import validate_study

    with pytest.raises(StudyError, match="--trust-remote-code"):
        validate_study(remote_code_study, "rc", progress=False, echo=lambda m: None)
    from autocomp.validation.runner import load_validation

    assert load_validation(remote_code_study, "rc") is None
    # with the flag the same command runs
    stored = validate_study(remote_code_study, "rc", progress=False, echo=lambda m: None, trust_remote_code=True)
    assert stored["trials"]


# ---- further faults of the same kinds -----------------------------------------------------------

def test_a_kl_topk_above_the_vocabulary_keeps_the_whole_vocabulary(tiny_models):
    from autocomp.evaluators.quality import score_windows
    from autocomp.inputs.models import load_model

    loaded = load_model(str(tiny_models["llama"]))
    ids = torch.randint(3, 300, (2, 16))
    scores, ref = score_windows(loaded.model, ids, topk=100000)
    assert ref.topk_indices.shape == (2, 15, loaded.model.config.vocab_size)
    again, _ = score_windows(loaded.model, ids, reference=ref)
    assert float(again.kl.abs().max()) < 1e-6


# ---- 10. what the commands print -----------------------------------------------------------------

def test_nothing_feasible_names_the_budgets(capsys):
    from autocomp.api import Recommendation
    from autocomp.cli.printing import print_recommendation
    from autocomp.config.objectives import Budgets

    print_recommendation(Recommendation(None, by="search", budgets=Budgets(max_ppl_increase_pct=1.5, max_size_mb=40)),
                         "sqlite:///x.db", "s")
    err = capsys.readouterr().err
    assert "+1.5%" in err and "40 MB" in err and " ;" not in err, err


def test_the_export_hint_is_shell_quoted():
    import shlex

    from autocomp.cli.printing import export_hint

    hint = export_hint("postgresql://u:pw@h/db?sslmode=require&x=1", "a b;rm -rf ~", 3)
    words = shlex.split(hint.split("export it: ", 1)[1])
    assert words[words.index("--storage") + 1] == "postgresql://u:***@h/db?sslmode=require&x=1"
    assert words[words.index("--study-name") + 1] == "a b;rm -rf ~"
    assert "pw@" not in hint


def test_printing_copes_with_non_finite_figures(capsys):
    from autocomp.api import Recommendation
    from autocomp.cli.printing import fmt_metrics, print_front, print_recommendation
    from autocomp.store.records import TrialRecord

    study = _records({0: {"perplexity": math.nan, "size_mb": 0.4, "kl": None},
                      1: {"perplexity": 10.1, "size_mb": 0.6, "kl": 0.01}})
    entry = _entry(10.1, None)
    entry["sets"]["heldout"].update(perplexity=None, ppl_increase_pct=None, ppl_increase_ci=[None, None])
    validation = {"sets": {"search": {"label": "s"}, "heldout": {"label": "h"}}, "level": 0.95,
                  "dense": {"sets": {}, "tasks": {}}, "trials": {"0": entry, "1": _entry(10.1, 0.0)}}
    from autocomp.validation.verdicts import verdicts

    judged = verdicts(study, validation)
    print_recommendation(Recommendation(study.records[1], by="heldout", validation=validation, verdicts=judged,
                                        records=study), "sqlite:///x.db", "s")
    print_front([TrialRecord(0, {"perplexity": math.inf, "size_mb": 1.0, "kl": math.nan}, {})], json_out=False)
    assert "nan" in fmt_metrics({"perplexity": None, "size_mb": math.nan})
    text = capsys.readouterr().out
    assert "inf" in text and "recommended: trial 1" in text
    print_front([TrialRecord(0, {"perplexity": math.inf, "size_mb": 1.0, "kl": math.nan}, {})], json_out=True)
    out = capsys.readouterr().out
    front = json.loads(out, parse_constant=lambda token: pytest.fail(f"{token} in JSON output"))
    assert front[0]["metrics"]["perplexity"] is None


def test_the_not_reproduced_verdict_is_printed(capsys):
    from autocomp.api import Recommendation
    from autocomp.cli.printing import print_recommendation
    from autocomp.validation.verdicts import recommend_validated

    study = _records({0: {"perplexity": 10.1, "size_mb": 0.4, "kl": 0.01},
                      1: {"perplexity": 10.1, "size_mb": 0.6, "kl": 0.01}})
    validation = {"sets": {"search": {"label": "s"}, "heldout": {"label": "h"}}, "level": 0.95,
                  "dense": {"sets": {}, "tasks": {}}, "acc_budgets": {},
                  "trials": {"0": _entry(10.1, 0.5), "1": _entry(10.1, 0.0)}}
    best, judged = recommend_validated(study, validation)
    print_recommendation(Recommendation(best, by="heldout", validation=validation, verdicts=judged, records=study),
                         "sqlite:///x.db", "s")
    out = capsys.readouterr().out
    assert "NOT REPRODUCED" in out and "recommended: trial 1" in out
