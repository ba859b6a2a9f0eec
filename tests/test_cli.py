"""The command line end to end on tiny random models: search, pareto, recommend, export, compress,
changed specs and bad input.

Every command runs in a subprocess (the real console script), with the autocomp cache and the
Hugging Face offline switches in its environment and its storage under a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from cli_helpers import SMALL, assert_ok, run_cli
from cli_helpers import sqlite_url as storage_url

TRIALS = 14          # the mixed space has 3 x 4 = 12 uniform baselines; 2 more come from NSGA-II
PPL_BUDGET = 0.1     # percent: tight enough that some stored trials are infeasible on the tiny models
STUDY = "s"
ARCHS = ["llama", "gpt2"]


# ---- helpers --------------------------------------------------------------------------------------


def run_main(args: list) -> subprocess.CompletedProcess:
    """``autocomp.cli.main`` in this process (for the many cheap error cases); an unexpected exception
    propagates and fails the test, as a traceback would."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from autocomp.cli import main

    out, err = io.StringIO(), io.StringIO()
    env_before = set(os.environ)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as exc:  # argparse
                rc = exc.code
    finally:
        for key in set(os.environ) - env_before:  # main() sets a few library switches for its process
            del os.environ[key]
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, strict: bool = True) -> str:
    """Non-zero exit, no traceback, and exactly one ``autocomp: error:`` line that ends stderr.

    ``strict``: stderr is that one line and nothing else. Otherwise the only other lines allowed
    before it are the search's ``study ...`` header and transformers' weight-loading progress bar
    (for errors that can only be found once the search has started).
    """
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected a failure\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines, f"nothing on stderr (exit {proc.returncode}); stdout:\n{proc.stdout}"
    errors = [ln for ln in lines if ln.startswith("autocomp: error:")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], f"the error must be the last stderr line:\n{proc.stderr}"
    assert len(errors[0]) > len("autocomp: error: ") + 10, errors[0]
    if strict:
        assert lines == errors, f"stderr must be one line:\n{proc.stderr}"
    else:
        others = lines[:-1]
        assert all(ln.startswith("study ") or "Loading weights" in ln for ln in others), proc.stderr
    return errors[0]


def load_study(url: str, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def study_names(db: Path) -> list[str]:
    if not db.exists():
        return []
    return optuna.get_all_study_names(storage=storage_url(db))


def snapshot(url: str, name: str = STUDY) -> list[tuple]:
    """(number, state, values, params) of every trial: what must not change when a run is refused."""
    return [(t.number, t.state, t.values, t.params) for t in load_study(url, name).get_trials(deepcopy=False)]


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def stored_trials(url: str, name: str = STUDY):
    """Completed trials with their metrics, plus the dense perplexity and stored ppl budget."""
    study = load_study(url, name)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    dense_ppl = study.user_attrs["autocomp_dense"]["perplexity"]
    return study, done, dense_ppl


def ppl_increase(ppl: float, dense_ppl: float) -> float:
    return 100.0 * (ppl / dense_ppl - 1.0)


def expected_uniform_names() -> set[str]:
    """The 12 uniform configurations of search_spaces/mixed.yaml, as describe_uniform names them."""
    names = set()
    for level in (0.0, 0.25, 0.5):
        for bits in (4, 6, 8, 16):
            parts = []
            if level > 0:
                parts.append(f"wanda {level:g}")
            if bits < 16:
                parts.append(f"rtn {bits}b")
            names.add("uniform " + (" + ".join(parts) if parts else "dense"))
    return names


# ---- shared studies ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=ARCHS)
def study(request, tiny_models, tmp_path_factory, cache_dir):
    """One search of the mixed space per architecture, shared by the tests of this module."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"cli-{arch}")
    db = folder / "study.db"
    model = str(tiny_models[arch])
    args = ["search", "--model", model, "--space", "mixed", "--trials", TRIALS, *SMALL,
            "--max-ppl-increase", PPL_BUDGET, "--storage", storage_url(db), "--study-name", STUDY]
    proc = run_cli(args, folder, cache_dir)
    assert_ok(proc)
    return SimpleNamespace(arch=arch, model=model, dir=folder, db=db, url=storage_url(db), args=args, proc=proc,
                           cache=cache_dir)


@pytest.fixture(scope="module")
def small_study(tiny_models, tmp_path_factory, cache_dir):
    """A cheap study (bits space, 3 trials) for the tests that only need some stored study."""
    folder = tmp_path_factory.mktemp("cli-small")
    db = folder / "study.db"
    model = str(tiny_models["llama"])
    args = ["search", "--model", model, "--space", "bits", "--trials", 3, *SMALL,
            "--max-ppl-increase", PPL_BUDGET, "--storage", storage_url(db), "--study-name", STUDY]
    proc = run_cli(args, folder, cache_dir)
    assert_ok(proc)
    return SimpleNamespace(arch="llama", model=model, dir=folder, db=db, url=storage_url(db), args=args, proc=proc,
                           cache=cache_dir)


# ---- search / pareto / recommend -----------------------------------------------------------------

def test_search_completes_requested_trials(study):
    trials = load_study(study.url).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == TRIALS
    assert len(trials) == TRIALS, [t.state for t in trials]
    assert f"{TRIALS} completed trials ({TRIALS} run now" in study.proc.stderr
    assert "0 failed now" in study.proc.stderr
    assert "recommended: trial" in study.proc.stdout or "no configuration meets the budgets" in study.proc.stdout
    # nothing written relative to the working directory when --storage is given
    assert not (study.dir / "results").exists()
    # every completed trial stored its metrics and plan, and its Optuna values are (perplexity, size_mb)
    for t in trials:
        m = t.user_attrs["metrics"]
        assert t.values == [pytest.approx(m["perplexity"], rel=1e-12), pytest.approx(m["size_mb"], rel=1e-12)]
        assert t.user_attrs["plan"]["version"] == 1 and isinstance(t.user_attrs["plan"]["layers"], dict)
        # a plan names exactly the compressed layers: only the dense baseline has none
        assert bool(t.user_attrs["plan"]["layers"]) == (t.user_attrs.get("uniform") != "uniform dense"), t.number


def test_uniform_baselines_enqueued_first(study):
    from autocomp.store.records import load_records

    records = sorted(load_records(study.url, STUDY).records, key=lambda r: r.trial)
    expected = expected_uniform_names()
    first = records[:len(expected)]
    assert [r.trial for r in first] == list(range(len(expected)))
    assert {r.uniform for r in first} == expected
    study_obj = load_study(study.url)
    for t in study_obj.get_trials(deepcopy=False):
        assert bool(t.user_attrs.get("baseline")) == (t.number < len(expected)), t.number
    # the uniform dense baseline is the dense model: same perplexity as the stored dense reference
    dense_rec = next(r for r in first if r.uniform == "uniform dense")
    dense = study_obj.user_attrs["autocomp_dense"]
    assert dense_rec.metrics["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-9)
    assert dense_rec.metrics["size_bytes"] == dense["size_bytes"]
    assert dense_rec.metrics["compression_ratio"] == 1.0


def test_pareto_json_is_the_feasible_front(study):
    proc = run_cli(["pareto", "--storage", study.url, "--study-name", STUDY, "--json"], study.dir, study.cache)
    assert_ok(proc)
    front = json.loads(proc.stdout)
    assert isinstance(front, list) and front
    _, done, dense_ppl = stored_trials(study.url)
    by_number = {t.number: t for t in done}
    for point in front:
        assert {"trial", "metrics", "plan"} <= set(point)
        assert isinstance(point["trial"], int) and point["trial"] in by_number
        assert {"perplexity", "size_mb"} <= set(point["metrics"])
        assert isinstance(point["plan"], dict) and isinstance(point["plan"]["layers"], dict)
        stored = by_number[point["trial"]]
        assert point["metrics"] == stored.user_attrs["metrics"]
        assert point["plan"] == stored.user_attrs["plan"]
        assert point["feasible"] is True

    def vec(t):
        m = t.user_attrs["metrics"]
        return (m["perplexity"], m["size_mb"])

    feasible = [t for t in done if ppl_increase(t.user_attrs["metrics"]["perplexity"], dense_ppl) <= PPL_BUDGET]
    infeasible = [t for t in done if t not in feasible]
    assert infeasible, "budget too loose for a meaningful test: every trial is feasible"
    front_numbers = {p["trial"] for p in front}
    for point in front:
        t = by_number[point["trial"]]
        assert ppl_increase(t.user_attrs["metrics"]["perplexity"], dense_ppl) <= PPL_BUDGET + 1e-12
        assert not any(dominates(vec(o), vec(t)) for o in feasible), f"trial {t.number} is dominated"
    # and the front is complete: every feasible non-dominated trial is on it
    expected = {t.number for t in feasible if not any(dominates(vec(o), vec(t)) for o in feasible)}
    assert front_numbers == expected
    # sorted by size
    sizes = [p["metrics"]["size_mb"] for p in front]
    assert sizes == sorted(sizes)


def _expected_recommendation(url: str, max_ppl: float | None, max_size: float | None) -> int | None:
    """The rule of autocomp.front.recommend(prefer='auto'), computed here from stored metrics."""
    _, done, dense_ppl = stored_trials(url)
    ok = []
    for t in done:
        m = t.user_attrs["metrics"]
        if max_ppl is not None and ppl_increase(m["perplexity"], dense_ppl) > max_ppl:
            continue
        if max_size is not None and m["size_mb"] > max_size:
            continue
        ok.append(t)
    if not ok:
        return None
    if max_ppl is not None:   # a quality budget: smallest, then best quality
        key = lambda t: (t.user_attrs["metrics"]["size_mb"], t.user_attrs["metrics"]["perplexity"])  # noqa: E731
    else:                     # only a size budget: best quality, then smallest
        key = lambda t: (t.user_attrs["metrics"]["perplexity"], t.user_attrs["metrics"]["size_mb"])  # noqa: E731
    return min(ok, key=key).number


@pytest.mark.parametrize("study", ["llama"], indirect=True)
def test_recommend_under_new_budgets_reads_stored_trials(study):
    before = snapshot(study.url)
    base = ["recommend", "--storage", study.url, "--study-name", STUDY, "--json", "--by", "search"]

    proc = run_cli(base, study.dir, study.cache)
    assert_ok(proc)
    rec_study = json.loads(proc.stdout)
    assert rec_study["trial"] == _expected_recommendation(study.url, PPL_BUDGET, None)

    # a looser quality budget allows a smaller configuration
    loose = 1.0
    proc = run_main(base + ["--max-ppl-increase", loose])
    assert_ok(proc)
    rec_loose = json.loads(proc.stdout)
    assert rec_loose["trial"] == _expected_recommendation(study.url, loose, None)
    assert rec_loose["metrics"]["size_mb"] <= rec_study["metrics"]["size_mb"]

    # only a size budget: best quality that fits; choose a bound that excludes the dense model
    _, done, _ = stored_trials(study.url)
    sizes = sorted({t.user_attrs["metrics"]["size_mb"] for t in done})
    bound = (sizes[0] + sizes[1]) / 2   # only the smallest configuration(s) fit
    proc = run_main(base + ["--max-size-mb", bound])
    assert_ok(proc)
    rec_size = json.loads(proc.stdout)
    assert rec_size["trial"] == _expected_recommendation(study.url, None, bound)
    assert rec_size["metrics"]["size_mb"] == sizes[0]
    bound2 = (sizes[-1] + sizes[-2]) / 2  # everything but the largest fits: a different answer
    proc = run_main(base + ["--max-size-mb", bound2])
    assert_ok(proc)
    rec_size2 = json.loads(proc.stdout)
    assert rec_size2["trial"] == _expected_recommendation(study.url, None, bound2)
    assert rec_size2["trial"] != rec_size["trial"]

    # nothing feasible: exit 3, JSON null
    proc = run_cli(base + ["--max-size-mb", "0.0001"], study.dir, study.cache)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout) is None
    assert "Traceback" not in proc.stderr
    proc = run_main(["recommend", "--storage", study.url, "--study-name", STUDY, "--max-size-mb", "0.0001",
                     "--by", "search"])
    assert proc.returncode == 3
    assert "no stored configuration meets the budgets" in proc.stderr and "Traceback" not in proc.stderr

    # recommend ran nothing and changed nothing
    assert snapshot(study.url) == before


@pytest.mark.parametrize("study", ["llama"], indirect=True)
def test_pareto_under_new_budgets(study):
    """``pareto`` with budgets given on the command line replaces the study's budgets."""
    loose = 1.0
    proc = run_main(["pareto", "--storage", study.url, "--study-name", STUDY, "--json", "--max-ppl-increase", loose])
    assert_ok(proc)
    front = json.loads(proc.stdout)
    _, done, dense_ppl = stored_trials(study.url)
    vec = {t.number: (t.user_attrs["metrics"]["perplexity"], t.user_attrs["metrics"]["size_mb"]) for t in done}
    feasible = [n for n in vec if ppl_increase(vec[n][0], dense_ppl) <= loose]
    expected = {n for n in feasible if not any(dominates(vec[o], vec[n]) for o in feasible)}
    assert {p["trial"] for p in front} == expected


# ---- export / compress ---------------------------------------------------------------------------

def _pick_trial(url: str):
    """A completed trial that both prunes and quantizes some layers (most interesting to rebuild)."""
    from autocomp.store.records import load_records

    records = load_records(url, STUDY)
    candidates = [r for r in records.records if 0 < r.metrics["avg_sparsity"] and r.metrics["avg_bits"] < 16]
    assert candidates
    non_uniform = [r for r in candidates if r.uniform is None]
    return records, min(non_uniform or candidates, key=lambda r: r.metrics["size_mb"])


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors weights in {folder}"
    return out


def test_export_reproduces_the_trial(study, tmp_path):
    from transformers import AutoModelForCausalLM

    from autocomp.evaluators.quality import score_windows
    from autocomp.config.plan import CompressionPlan
    from autocomp.study.evaluate import TrialEvaluator

    records, record = _pick_trial(study.url)
    out = tmp_path / "export"
    proc = run_cli(["export", "--storage", study.url, "--study-name", STUDY, "--trial", record.trial, "--out", out,
                    "--format", "float"], tmp_path, study.cache)
    assert_ok(proc)
    assert (out / "config.json").exists() and (out / "plan.json").exists()
    assert CompressionPlan.load(out / "plan.json").to_dict() == record.plan
    info = json.loads((out / "autocomp.json").read_text())
    assert info["trial"] == record.trial and info["study_name"] == STUDY
    assert info["accounted_size_bytes"] == record.metrics["size_bytes"]

    exported = AutoModelForCausalLM.from_pretrained(out)
    exported.eval()
    assert next(exported.parameters()).dtype == torch.float32

    # rebuild the trial in this process from its stored parameters, as the search scored it
    spec = records.spec
    evaluator = TrialEvaluator(spec)
    per_layer = spec.space.suggest(optuna.trial.FixedTrial(record.params), evaluator.targets)
    assert CompressionPlan.explicit(per_layer, calibration=evaluator.calibration,
                                    embeddings=any(not t.in_blocks for t in evaluator.targets)).to_dict() == record.plan
    metrics = evaluator.evaluate(per_layer)
    assert metrics["perplexity"] == pytest.approx(record.metrics["perplexity"], rel=1e-9)
    assert metrics["size_bytes"] == record.metrics["size_bytes"]

    windows = evaluator.eval_windows.input_ids
    with torch.no_grad():
        ours = evaluator.loaded.model(windows, use_cache=False).logits
        theirs = exported(windows, use_cache=False).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()

    # the export is really compressed: it differs from the dense model
    dense = _load_weights(Path(study.model))
    weights = _load_weights(out)
    assert any(not torch.equal(dense[k], weights[k]) for k in dense if k in weights)

    # the stored perplexity is the exported model's perplexity on the same windows
    scores, _ = score_windows(exported, windows)
    assert scores.perplexity == pytest.approx(record.metrics["perplexity"], rel=1e-4)

    # compress with the plan written beside the weights gives the same weights
    out2 = tmp_path / "compressed"
    proc = run_cli(["compress", "--model", study.model, "--plan", out / "plan.json", "--out", out2, "--format", "float"],
                   tmp_path, study.cache)
    assert_ok(proc)
    again = _load_weights(out2)
    assert set(again) == set(weights)
    for k in weights:
        assert torch.equal(weights[k], again[k]), k
    assert json.loads((out2 / "autocomp.json").read_text())["accounted_size_bytes"] == record.metrics["size_bytes"]

    # exporting into a non-empty folder is refused, and leaves it as it was
    proc = run_main(["export", "--storage", study.url, "--study-name", STUDY, "--trial", record.trial, "--out", out])
    assert "not empty" in assert_one_line_error(proc)
    assert _load_weights(out).keys() == weights.keys()


def test_packed_export_matches_accounted_size_and_reloads(study, tmp_path):
    """The packed export stores packed codes: bytes on disk within 2% of the accounted size, and the
    reloaded model scores what the trial scored (up to the 16-bit storage of its other tensors).
    (GPT-2's Conv1D layers are packed and reloaded in test_packed.py; one architecture suffices here.)"""
    if study.arch != "llama":
        pytest.skip("one architecture end to end is enough; every format and architecture: test_packed.py")
    from autocomp.deploy.packed_io import PACKED_FILE
    from autocomp.evaluators.quality import score_windows
    from autocomp.inputs.models import load_model
    from autocomp.study.evaluate import TrialEvaluator

    records, record = _pick_trial(study.url)
    out = tmp_path / "packed"
    proc = run_cli(["export", "--storage", study.url, "--study-name", STUDY, "--trial", record.trial, "--out", out,
                    "--format", "packed"], tmp_path, study.cache)
    assert_ok(proc)
    assert "on disk" in proc.stdout
    info = json.loads((out / "autocomp.json").read_text())
    assert info["format"] == "packed" and info["accounted_size_bytes"] == record.metrics["size_bytes"]
    on_disk = (out / PACKED_FILE).stat().st_size
    assert on_disk == info["bytes_on_disk"]
    assert not list(out.glob("model*.safetensors"))[1:], "only the packed file holds weights"
    # the tiny model's safetensors header is a few KB: the bound is loose here, tight on real models
    assert abs(on_disk - record.metrics["size_bytes"]) <= 0.02 * record.metrics["size_bytes"] + 16_384
    exported = load_model(str(out))
    evaluator = TrialEvaluator(records.spec)
    windows = evaluator.eval_windows.input_ids
    scores, _ = score_windows(exported.model, windows)
    assert scores.perplexity == pytest.approx(record.metrics["perplexity"], rel=2e-3)
    assert scores.perplexity != pytest.approx(evaluator.dense.perplexity, rel=1e-4)


def test_the_default_export_loads_with_plain_from_pretrained(study, tmp_path):
    """The default export is compressed-tensors: plain ``from_pretrained`` loads it, it scores what the
    trial scored (up to the float16 storage of the tensors it keeps in floating point), and its
    quantized linear layers stay low-bit on disk (GPT-2's Conv1D layers cannot: they are named)."""
    from transformers import AutoModelForCausalLM

    from autocomp.evaluators.quality import score_windows
    from autocomp.study.evaluate import TrialEvaluator

    records, record = _pick_trial(study.url)
    out = tmp_path / "default"
    proc = run_cli(["export", "--storage", study.url, "--study-name", STUDY, "--trial", record.trial, "--out", out],
                   tmp_path, study.cache)
    assert_ok(proc)
    info = json.loads((out / "autocomp.json").read_text())
    assert info["format"] == "compressed-tensors"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = TrialEvaluator(records.spec).eval_windows.input_ids
    scores, _ = score_windows(exported, windows)
    assert scores.perplexity == pytest.approx(record.metrics["perplexity"], rel=5e-3)
    dense_fp16 = 2 * sum(t.numel() for t in _load_weights(Path(study.model)).values())
    if study.arch == "gpt2":   # compressed-tensors quantizes nn.Linear only: GPT-2's Conv1D layers stay float
        assert any("Conv1D" in d["reason"] for d in info["stored_dequantized"].values())
    else:
        assert info["bytes_on_disk"] < dense_fp16


# ---- changed spec / infeasible budget ------------------------------------------------------------

@pytest.mark.parametrize("change, mentions, resume", [
    (["--max-ppl-increase", "7"], ["max_ppl_increase_pct", "7"], True),
    (["--eval-windows", "5"], ["eval_windows.count", "5"], False),
    (["--seed", "3"], ["seed"], False),
])
def test_changed_spec_is_refused(small_study, tmp_path, change, mentions, resume):
    db = tmp_path / "copy.db"
    shutil.copy(small_study.db, db)
    url = storage_url(db)
    before = snapshot(url)
    args = list(small_study.args)
    args[args.index("--storage") + 1] = url
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    args[args.index("--trials") + 1] = "20"   # asking for more must not get round the check
    proc = run_cli(args, tmp_path, small_study.cache) if resume else run_main(args)
    assert proc.returncode == 2, proc.stderr
    line = assert_one_line_error(proc, strict=False)
    assert "different specification" in line
    for word in mentions:
        assert word in line, line
    assert snapshot(url) == before
    if not resume:
        return

    # the original command still resumes the study
    same = list(small_study.args)
    same[same.index("--storage") + 1] = url
    proc = run_cli(same, tmp_path, small_study.cache)
    assert_ok(proc)
    assert "nothing to run" in proc.stderr
    assert snapshot(url) == before


def test_infeasible_budget_creates_no_study(tiny_models, tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "study.db"
    args = ["search", "--model", tiny_models["llama"], "--space", "bits", "--trials", 3, *SMALL,
            "--storage", storage_url(db), "--study-name", "budget"]
    proc = run_main(args + ["--max-size-mb", "0.0001"])
    assert proc.returncode == 2
    line = assert_one_line_error(proc, strict=False)
    assert "--max-size-mb 0.0001 cannot be met" in line
    assert study_names(db) == []

    proc = run_cli(args + ["--max-size-mb", "1"], tmp_path, cache_dir)
    assert_ok(proc)
    study = load_study(storage_url(db), "budget")
    assert study.user_attrs["autocomp_spec"]["budgets"]["max_size_mb"] == 1
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


# ---- bad input -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "bad.jsonl").write_text('{"text": "fine"}\nthis is not json\n')
    (d / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (d / "a-folder.txt").mkdir()
    (d / "space-unknown-key.yaml").write_text("name: x\ngranularity: layer\nsparsity:\n  levels: [0.0]\n  colour: red\n")
    (d / "space-top-key.yaml").write_text("name: x\nbitz: [4]\n")
    (d / "plan-not-json.json").write_text('{"version": 1, "layers": {')
    (d / "plan-unknown-key.json").write_text(json.dumps({"version": 1, "layerz": {}}))
    (d / "plan-bad-bits.json").write_text(json.dumps({"version": 1, "default": {"method": "rtn", "bits": 7}}))
    (d / "plan-no-layer.json").write_text(json.dumps({"version": 1, "layers": {"no.such.layer": {"method": "rtn", "bits": 4}}}))
    return d


BAD_SEARCH = {
    # id: (extra args replacing the defaults, strict one-line stderr, words the message must contain)
    "hub-model": (["--model", "no-such-org/no-such-model-xyz"], False, ["no-such-org/no-such-model-xyz"]),
    "missing-path": (["--model", "./missing-model"], True, ["missing-model", "does not exist"]),
    "data-missing": (["--data", "{d}/nope.txt"], True, ["nope.txt", "does not exist"]),
    "data-folder": (["--data", "{d}/a-folder.txt"], True, ["a-folder.txt"]),
    "data-bad-jsonl": (["--data", "{d}/bad.jsonl"], True, ["bad.jsonl:2", "JSON"]),
    "data-jsonl-no-text": (["--data", "{d}/notext.jsonl"], True, ["notext.jsonl:1", "text"]),
    "calib-data-missing": (["--calib-data", "{d}/nope.jsonl"], True, ["nope.jsonl"]),
    "space-unknown-key": (["--space", "{d}/space-unknown-key.yaml"], True, ["colour", "space-unknown-key.yaml"]),
    "space-unknown-top-key": (["--space", "{d}/space-top-key.yaml"], True, ["bitz"]),
    "space-missing": (["--space", "no-such-space"], True, ["no-such-space"]),
    "storage-scheme": (["--storage", "foo://bar"], True, ["foo://bar"]),
    "storage-missing-dir": (["--storage", "sqlite:////nonexistent-dir/x/y.db"], True, ["/nonexistent-dir/x"]),
    "storage-folder": (["--storage", "sqlite:///{d}"], True, ["folder"]),
    "negative-ppl-budget": (["--max-ppl-increase", "-1"], True, ["--max-ppl-increase"]),
    "negative-size-budget": (["--max-size-mb", "-3"], True, ["--max-size-mb"]),
    "negative-kl-budget": (["--max-kl", "-0.5"], True, ["--max-kl"]),
    "zero-trials": (["--trials", "0"], False, ["--trials"]),
    "bad-objective": (["--objectives", "perplexity,speed"], True, ["speed"]),
    "zero-windows": (["--eval-windows", "0"], True, ["window count"]),
    "variant-cache-unwritable": (["--variant-cache", "{d}/plan-not-json.json/variants"], True,
                                 ["variant cache folder", "plan-not-json.json/variants", "--variant-cache none"]),
    "too-many-windows": (["--eval-windows", "100000"], False, ["windows"]),
}


def _bad_search_args(case: str, bad_files: Path, model: Path, db: Path) -> tuple[list[str], bool, list[str]]:
    extra, strict, words = BAD_SEARCH[case]
    extra = [a.replace("{d}", str(bad_files)) for a in extra]
    opts = {"--model": str(model), "--space": "bits", "--trials": "2", "--storage": storage_url(db), "--study-name": "bad"}
    for flag, value in zip(extra[::2], extra[1::2]):
        opts[flag] = value
    return ["search", *SMALL] + [x for kv in opts.items() for x in kv], strict, words


# In this process huggingface_hub may have read HF_HUB_OFFLINE before conftest.py set it (the tiny
# models are built first), so a hub lookup could wait on the network: that case runs only as a subprocess.
def _assert_refused(proc, strict: bool, words, db: Path, workdir: Path) -> None:
    """Exit 2 with one error line naming ``words``; no study created, nothing written in ``workdir``."""
    assert proc.returncode == 2
    line = assert_one_line_error(proc, strict=strict)
    for word in words:
        assert word in line, line
    assert study_names(db) == []
    # (WAL mode's -wal/-shm companions live as long as a connection is open)
    assert sorted(p.name for p in workdir.iterdir() if not p.name.endswith(("-wal", "-shm"))) in ([], ["study.db"])


@pytest.mark.parametrize("case", sorted(set(BAD_SEARCH) - {"hub-model"}))
def test_bad_search_input(case, bad_files, tiny_models, tmp_path, monkeypatch):
    """In process through ``autocomp.cli.main`` (cheap); a few cases also run through the console script below."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "study.db"
    args, strict, words = _bad_search_args(case, bad_files, tiny_models["llama"], db)
    _assert_refused(run_main(args), strict, words, db, tmp_path)


@pytest.mark.parametrize("case", ["hub-model", "missing-path", "data-bad-jsonl", "storage-missing-dir"])
def test_bad_search_input_console_script(case, bad_files, tiny_models, tmp_path, cache_dir):
    db = tmp_path / "study.db"
    args, strict, words = _bad_search_args(case, bad_files, tiny_models["llama"], db)
    _assert_refused(run_cli(args, tmp_path, cache_dir), strict, words, db, tmp_path)


@pytest.mark.parametrize("plan_file, words", [
    ("plan-not-json.json", ["not valid JSON"]),
    ("plan-unknown-key.json", ["layerz"]),
    ("plan-bad-bits.json", ["bits"]),
    ("plan-no-layer.json", ["no.such.layer"]),
    ("no-such-plan.json", ["no-such-plan.json"]),
])
def test_bad_plan_for_compress(plan_file, words, bad_files, tiny_models, tmp_path):
    out = tmp_path / "out"
    proc = run_main(["compress", "--model", tiny_models["llama"], "--plan", bad_files / plan_file, "--out", out])
    assert proc.returncode == 2
    line = assert_one_line_error(proc)
    for word in words:
        assert word in line, line
    assert not out.exists() or not any(out.iterdir())


def test_bad_plan_for_compress_console_script(bad_files, tiny_models, tmp_path, cache_dir):
    out = tmp_path / "out"
    proc = run_cli(["compress", "--model", tiny_models["llama"], "--plan", bad_files / "plan-not-json.json",
                    "--out", out], tmp_path, cache_dir)
    assert proc.returncode == 2
    assert "not valid JSON" in assert_one_line_error(proc)
    assert not out.exists() or not any(out.iterdir())


def test_bad_reads_of_a_study(small_study, tmp_path):
    url = small_study.url
    cases = [
        (["pareto", "--storage", "foo://bar", "--study-name", STUDY], ["foo://bar"]),
        (["pareto", "--storage", url, "--study-name", "no-such-study"], ["no-such-study"]),
        (["recommend", "--storage", url, "--study-name", STUDY, "--max-kl", "-1"], ["--max-kl"]),
        (["export", "--storage", url, "--study-name", STUDY, "--trial", "999", "--out", tmp_path / "x"], ["999"]),
    ]
    before = snapshot(url)
    for args, words in cases:
        proc = run_main(args)
        assert proc.returncode == 2, (args, proc.stderr)
        line = assert_one_line_error(proc)
        for word in words:
            assert word in line, line
    assert snapshot(url) == before
    assert not (tmp_path / "x").exists()


def test_spaces_lists_builtins(tmp_path, cache_dir):
    proc = run_cli(["spaces"], tmp_path, cache_dir)
    assert_ok(proc)
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"bits", "demo", "mixed", "sparsity"} <= names


def test_cache_command_reports_and_prunes(tmp_path, cache_dir):
    from autocomp.pipeline.layer import CompressedWeight
    from autocomp.pipeline.variants import LayerVariantCache

    folder = tmp_path / "variants"
    cache = LayerVariantCache(directory=folder)   # a folder the cache wrote (its marker and naming)
    for i in range(3):
        cache.get_compressed(f"{i:02d}" + "a" * 62, lambda: CompressedWeight(torch.zeros(10, 100), None, None))
    proc = run_cli(["cache", "--dir", folder], tmp_path, cache_dir)
    assert_ok(proc)
    assert "3 variants" in proc.stdout
    proc = run_cli(["cache", "--dir", folder, "--max-gb", "0"], tmp_path, cache_dir)
    assert_ok(proc)
    assert "removed 3" in proc.stdout and not list(folder.rglob("*.safetensors"))
    bad = run_cli(["cache", "--dir", folder, "--max-gb", "-1"], tmp_path, cache_dir)
    assert bad.returncode == 2 and "--max-gb" in assert_one_line_error(bad)
