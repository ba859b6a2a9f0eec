"""Held-out and second-domain validation of a study's front, bootstrap intervals, and verdicts."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import SMALL, assert_ok, run_cli


@pytest.fixture(scope="module")
def validated(tiny_models, tmp_path_factory):
    """A finished search on the tiny Llama, validated by ``autocomp search`` itself."""
    folder = tmp_path_factory.mktemp("validated")
    cache = tmp_path_factory.getbasetemp() / "autocomp-cache"
    url = f"sqlite:///{folder}/study.db"
    proc = run_cli(["search", "--model", tiny_models["llama"], "--space", "bits", "--trials", 10, "--storage", url,
                    "--study-name", "v", "--max-ppl-increase", "2", "--heldout-windows", 8, "--extra", "code=pycode",
                    *SMALL], folder, cache)
    assert_ok(proc)
    return folder, url, cache, proc


def _load(url):
    from autocomp.store.records import load_records
    from autocomp.validation.runner import load_validation

    return load_records(url, "v"), load_validation(url, "v")


# ---- bootstrap intervals -------------------------------------------------------------------------

def test_interval_narrows_as_windows_grow():
    from autocomp.validation.bootstrap import paired_increase_interval, perplexity_interval

    gen = torch.Generator().manual_seed(0)
    widths, paired = [], []
    for n in (4, 16, 64, 256):
        tokens = torch.full((n,), 255.0)
        dense = 255.0 * (3.0 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64))
        damaged = dense + 255.0 * (0.05 + 0.03 * torch.randn(n, generator=gen, dtype=torch.float64))
        ppl = perplexity_interval(dense, tokens, replicates=2000)
        inc = paired_increase_interval(damaged, dense, tokens, replicates=2000)
        assert ppl.low <= ppl.value <= ppl.high and inc.low <= inc.value <= inc.high
        widths.append(ppl.width)
        paired.append(inc.width)
    assert widths == sorted(widths, reverse=True) and paired == sorted(paired, reverse=True)
    # the standard error falls as 1/sqrt(n): 16x the windows, about a quarter of the width
    assert 0.15 < widths[-1] / widths[1] < 0.4 and 0.15 < paired[-1] / paired[1] < 0.4
    # pairing removes the shared text difficulty: the ratio's interval is far narrower than the
    # interval of the compressed perplexity alone
    alone = perplexity_interval(damaged, tokens, replicates=2000)
    assert inc.width / 100 < 0.5 * alone.width / alone.value


def test_accuracy_drop_interval_is_paired_and_narrows_with_documents():
    from autocomp.validation.bootstrap import paired_drop_interval

    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (50, 200, 800):
        dense = (torch.rand(n, generator=gen) < 0.5).double()
        flips = torch.rand(n, generator=gen) < 0.1          # the compressed model loses 10% of the hits
        compressed = torch.where(flips, torch.zeros_like(dense), dense)
        drop = paired_drop_interval(dense, compressed)
        assert drop.low <= drop.value <= drop.high
        assert drop.value == pytest.approx(100 * float(dense.mean() - compressed.mean()))
        widths.append(drop.width)
    assert widths == sorted(widths, reverse=True)
    # pairing: the interval of the drop is far narrower than +-1.96 unpaired standard errors (about 19.6 points at n=200)
    assert widths[1] < 10


def test_interval_is_deterministic_and_degenerate_when_models_agree():
    from autocomp.validation.bootstrap import paired_increase_interval

    nll, tokens = torch.tensor([700.0, 800.0, 650.0]), torch.tensor([255, 255, 255])
    a = paired_increase_interval(nll + 3, nll, tokens, seed=1)
    assert a == paired_increase_interval(nll + 3, nll, tokens, seed=1)
    same = paired_increase_interval(nll, nll, tokens)
    assert same.value == same.low == same.high == 0.0
    with pytest.raises(ValueError):
        paired_increase_interval(nll, nll[:2], tokens)


def test_interval_on_a_real_model_narrows_with_more_windows(tiny_models):
    from autocomp.inputs.data import WindowSpec, text_windows
    from autocomp.evaluators.quality import score_windows
    from autocomp.inputs.models import load_model
    from autocomp.config.plan import LayerPlan
    from autocomp.pipeline.stitch import ModelStitcher
    from autocomp.inputs.targets import find_targets
    from autocomp.validation.bootstrap import paired_increase_interval

    loaded = load_model(str(tiny_models["llama"]))
    windows = text_windows(loaded.tokenizer, "wikitext2", "test", WindowSpec(32, 64), random=False)
    dense, _ = score_windows(loaded.model, windows.input_ids)
    targets = find_targets(loaded.model)
    ModelStitcher(loaded.model, targets, loaded.fingerprint).apply(
        {t.name: LayerPlan(method="rtn", bits=2, group_size=32) for t in targets if t.in_blocks})
    damaged, _ = score_windows(loaded.model, windows.input_ids)
    few = paired_increase_interval(damaged.nll[:4], dense.nll[:4], damaged.tokens[:4])
    many = paired_increase_interval(damaged.nll, dense.nll, damaged.tokens)
    assert many.width < few.width
    assert many.value == pytest.approx(100 * (damaged.perplexity / dense.perplexity - 1))


# ---- windows -------------------------------------------------------------------------------------

def test_heldout_windows_follow_the_searched_ones(tiny_models):
    from autocomp.inputs.data import WindowSpec, text_windows
    from autocomp.errors import DataError
    from autocomp.inputs.models import load_model

    tok = load_model(str(tiny_models["llama"])).tokenizer
    both = text_windows(tok, "wikitext2", "test", WindowSpec(6, 64), random=False)
    held = text_windows(tok, "wikitext2", "test", WindowSpec(2, 64), random=False, skip=4)
    assert torch.equal(held.input_ids, both.input_ids[4:])
    with pytest.raises(DataError, match="after the first"):
        text_windows(tok, "wikitext2", "test", WindowSpec(4, 64), random=False, skip=10**6)


# ---- the validated study -------------------------------------------------------------------------

def test_search_validates_its_front(validated):
    from autocomp.validation.runner import default_trials

    _, url, _, proc = validated
    records, validation = _load(url)
    assert validation is not None
    assert list(validation["sets"]) == ["search", "heldout", "code"]
    assert validation["sets"]["heldout"]["skip"] == 4 and validation["sets"]["heldout"]["count"] == 8
    assert sorted(int(k) for k in validation["trials"]) == default_trials(records)
    uniform = {r.trial for r in records.records if r.uniform}
    assert uniform <= {int(k) for k in validation["trials"]}
    for key, entry in validation["trials"].items():
        stored = next(r for r in records.records if r.trial == int(key))
        # the plan stored in the study rebuilds the very model the search scored
        assert entry["search_reproduced_rel"] < 1e-9, key
        assert entry["sets"]["search"]["perplexity"] == pytest.approx(stored.metrics["perplexity"], rel=1e-9)
        for name, figures in entry["sets"].items():
            low, high = figures["ppl_increase_ci"]
            assert low <= figures["ppl_increase_pct"] <= high, (key, name)
            assert figures["kl_ci"][0] <= figures["kl"] <= figures["kl_ci"][1]
            assert figures["windows"] == validation["sets"][name]["count"]
        assert set(entry["verdict"]) >= {"search_feasible", "heldout_feasible", "flagged", "uncertain", "reasons"}
    out = proc.stdout
    assert "validated on:" in out and "heldout" in out and "95% CI" in out and "recommended: trial" in out


def _gap_trial(records, validation):
    """A trial whose held-out increase is above both its search increase and zero."""
    best = None
    for key, entry in validation["trials"].items():
        search, held = entry["sets"]["search"]["ppl_increase_pct"], entry["sets"]["heldout"]["ppl_increase_pct"]
        if held > max(search, 0.0) and (best is None or held - max(search, 0) > best[1]):
            best = (int(key), held - max(search, 0.0), max(search, 0.0), held)
    assert best is not None, "no trial degrades more on held-out windows than on searched ones"
    return best


def test_recommend_flags_a_config_that_breaks_the_budget_held_out(validated):
    folder, url, cache, _ = validated
    records, validation = _load(url)
    number, _, search_inc, held_inc = _gap_trial(records, validation)
    budget = (search_inc + held_inc) / 2
    args = ["recommend", "--storage", url, "--study-name", "v", "--max-ppl-increase", f"{budget:.6f}"]
    proc = run_cli(args + ["--json"], folder, cache)
    out = json.loads(proc.stdout)
    verdict = out["verdicts"][str(number)]
    assert verdict["search_feasible"] and not verdict["heldout_feasible"] and verdict["flagged"]
    assert "breaks" in verdict["reasons"][0] and "that the search met" in verdict["reasons"][0]
    assert out["by"] == "heldout" and out["trial"] != number
    if out["trial"] is not None:  # the recommendation holds on held-out data
        assert out["verdicts"][str(out["trial"])]["heldout_feasible"] and "heldout" in out["validation"]["sets"]
    text = run_cli(args, folder, cache)
    assert "FLAGGED" in text.stdout and str(number) in text.stdout.split("FLAGGED: trial(s)")[1].split("met")[0]
    # by search figures alone the flagged trial is still a candidate
    by_search = run_cli(args + ["--by", "search", "--json"], folder, cache)
    assert "verdicts" not in json.loads(by_search.stdout)


def test_verdict_rules_on_stored_figures():
    from autocomp.store.records import TrialRecord
    from autocomp.config.objectives import Budgets
    from autocomp.validation.verdicts import verdict

    record = TrialRecord(3, {"perplexity": 10.3, "size_mb": 100.0, "kl": 0.01}, {})
    entry = {"sets": {"search": {"ppl_increase_pct": 3.0},
                      "heldout": {"perplexity": 10.6, "ppl_increase_pct": 4.0, "ppl_increase_ci": [3.0, 6.0],
                                  "kl": 0.02, "kl_ci": [0.01, 0.03]}},
             "tasks": {"lastword": {"value": 0.40, "stderr": 0.01, "drop_points": 3.0}}}
    dense = {"tasks": {"lastword": {"value": 0.43, "stderr": 0.01}}}
    ok = verdict(record, entry, dense, Budgets(max_ppl_increase_pct=5), {}, dense_search_ppl=10.0)
    assert ok["search_feasible"] and ok["heldout_feasible"] and not ok["flagged"] and ok["uncertain"]
    broken = verdict(record, entry, dense, Budgets(max_ppl_increase_pct=3.5), {}, dense_search_ppl=10.0)
    assert broken["flagged"] and "+4.00%" in broken["reasons"][0]
    acc = verdict(record, entry, dense, Budgets(max_ppl_increase_pct=5), {"lastword": 2.0}, dense_search_ppl=10.0)
    assert acc["flagged"] and "3.00 points" in acc["reasons"][0]
    missing = verdict(record, entry, dense, Budgets(), {"other": 1.0}, dense_search_ppl=10.0)
    assert not missing["heldout_feasible"] and "not evaluated" in missing["reasons"][0]


def test_validation_resumes_and_keeps_other_settings(validated):
    from autocomp.validation.runner import ValidationConfig, load_validation, validate_study

    _, url, _, _ = validated
    first = load_validation(url, "v")

    def no_model(spec):
        raise AssertionError("nothing was left to validate, so no model should be loaded")

    again = validate_study(url, "v", ValidationConfig(heldout_windows=8, extra={"code": "pycode"}), progress=False,
                           echo=lambda m: None, evaluator_factory=no_model)
    assert again["trials"].keys() == first["trials"].keys()
    other = validate_study(url, "v", ValidationConfig(heldout_windows=4, trials=(0,)), progress=False,
                           echo=lambda m: None)
    assert other["digest"] != first["digest"] and list(other["trials"]) == ["0"]
    assert load_validation(url, "v")["digest"] == other["digest"]
    kept = load_validation(url, "v", first["digest"])
    assert kept is not None and kept["trials"].keys() == first["trials"].keys()


def test_bad_validation_input_is_refused_and_nothing_is_lost(validated):
    folder, url, cache, _ = validated
    before = _load(url)[0].records
    cases = [
        (["--extra", "news=/no/such/file.txt"], "does not exist"),
        (["--extra", "search=pycode"], "set name"),
        (["--max-acc-drop", "wikitext_lastword=2"], "--tasks"),
        (["--trials", "999"], "trial 999"),
        (["--heldout-windows", "1"], "at least 2"),
        (["--heldout-windows", "100000"], "room for"),
    ]
    for extra, expected in cases:
        proc = run_cli(["validate", "--storage", url, "--study-name", "v", "--no-progress", *extra], folder, cache)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
    assert len(_load(url)[0].records) == len(before)


def test_recommend_by_heldout_needs_a_validation(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    url = f"sqlite:///{tmp_path}/plain.db"
    assert_ok(run_cli(["search", "--model", tiny_models["gpt2"], "--space", "bits", "--trials", 3, "--storage", url,
                       "--study-name", "p", "--no-validate", *SMALL], tmp_path, cache))
    proc = run_cli(["recommend", "--storage", url, "--study-name", "p", "--by", "heldout"], tmp_path, cache)
    assert proc.returncode == 2 and "autocomp validate" in proc.stderr
    plain = run_cli(["recommend", "--storage", url, "--study-name", "p"], tmp_path, cache)
    assert plain.returncode == 0 and "recommended: trial" in plain.stdout and "validated on" not in plain.stdout


def test_validate_with_an_lm_eval_task_and_an_accuracy_budget(validated):
    folder, url, cache, _ = validated
    args = ["validate", "--storage", url, "--study-name", "v", "--trials", "0,1", "--heldout-windows", "4",
            "--tasks", "wikitext_lastword", "--task-limit", "12", "--no-progress"]
    proc = run_cli(args + ["--max-acc-drop", "wikitext_lastword=100", "--json"], folder, cache)
    assert_ok(proc)
    validation = json.loads(proc.stdout)
    dense = validation["dense"]["tasks"]["wikitext_lastword"]
    assert dense["metric"] == "acc" and dense["n"] == 12 and 0 <= dense["value"] <= 1
    for key in ("0", "1"):
        task = validation["trials"][key]["tasks"]["wikitext_lastword"]
        assert task["n"] == 12 and len(task["per_doc"]) == 12
        assert sum(task["per_doc"]) / 12 == pytest.approx(task["value"])
        assert task["drop_points"] == pytest.approx(100 * (dense["value"] - task["value"]))
        assert task["drop_ci"][0] <= task["drop_points"] <= task["drop_ci"][1]
        assert validation["trials"][key]["verdict"]["heldout_feasible"] == \
            validation["trials"][key]["verdict"]["search_feasible"]  # a 100-point budget cannot break
    # the accuracy budgets are stored with the validation, and apply when none are given
    assert validation["acc_budgets"] == {"wikitext_lastword": 100.0}
    from autocomp.store.records import load_records
    from autocomp.validation.verdicts import recommend_validated

    records = load_records(url, "v")
    unmeasurable = {**validation, "acc_budgets": {"never_run": 1.0}}
    assert recommend_validated(records, unmeasurable)[0] is None
    assert any("not evaluated" in r for r in recommend_validated(records, unmeasurable)[1][0]["reasons"])
    assert recommend_validated(records, unmeasurable, acc_budgets={})[0] is not None
    # a budget below a measured drop breaks it; no drop at all can't break a 0-point budget
    worst = max(validation["trials"][k]["tasks"]["wikitext_lastword"]["drop_points"] for k in ("0", "1"))
    text = run_cli(["recommend", "--storage", url, "--study-name", "v", "--max-acc-drop",
                    f"wikitext_lastword={max(worst - 0.01, 0):.2f}"], folder, cache)
    assert "wikitext_lastword acc (drop)" in text.stdout
    if worst > 0.01:
        assert "accuracy dropped" in text.stdout


def test_report_of_a_validated_study(validated):
    import csv

    folder, url, cache, _ = validated
    proc = run_cli(["report", "--storage", url, "--study-name", "v", "--out", folder / "report"], folder, cache)
    assert_ok(proc)
    records, validation = _load(url)
    with open(folder / "report" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == len(records.records)
    with open(folder / "report" / "validation.csv") as f:
        assert {int(row["trial"]) for row in csv.DictReader(f)} == {int(k) for k in validation["trials"]}
    assert (folder / "report" / "report.html").stat().st_size > 100_000 and (folder / "report" / "front.png").exists()
