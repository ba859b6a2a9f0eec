"""Studies: resume, a worker killed mid-trial, failing trials, the TPE sampler, and the Python API
against the command line, on tiny random models with the storage under a temporary folder."""

from __future__ import annotations

import json

import optuna
import pytest
from cli_helpers import COMPLETE, FAIL, WAITING, assert_ok, count, open_storage, run_cli, search_args, trials_of
from cli_helpers import sqlite_url as storage_url

KILL_TIMEOUT_S = 120


# ---- a trial that raises ---------------------------------------------------------------------

def _spec(model, budgets=None, sampler="nsga2"):
    from autocomp.inputs.data import WindowSpec
    from autocomp.config.objectives import Budgets
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec

    return StudySpec(model=str(model), space=SearchSpace.load("bits"), eval_windows=WindowSpec(4, 64),
                     calib_windows=WindowSpec(4, 64, 0), budgets=budgets or Budgets(), sampler=sampler)


class FlakyEvaluator:
    """A real TrialEvaluator whose ``evaluate`` raises on chosen calls (1-based)."""

    def __init__(self, spec, fail_calls):
        from autocomp.study.evaluate import TrialEvaluator

        self._inner = TrialEvaluator(spec)
        self._fail_calls = fail_calls
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def evaluate(self, plan, *args, **kwargs):
        self.calls += 1
        if self._fail_calls(self.calls):
            raise RuntimeError(f"injected failure in evaluation call {self.calls}")
        return self._inner.evaluate(plan, *args, **kwargs)


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tiny_models, tmp_path):
    from autocomp.study.local import run_local

    url = storage_url(tmp_path / "study.db")
    spec = _spec(tiny_models["llama"])
    made = []

    def factory(s):
        made.append(FlakyEvaluator(s, lambda call: call == 3))
        return made[-1]

    outcome = run_local(spec, url, "flaky", 5, progress=False, evaluator_factory=factory, echo=lambda msg: None)
    assert (outcome.completed, outcome.ran, outcome.failed) == (5, 5, 1)
    assert len(made) == 1 and made[0].calls == 6

    trials = trials_of(url, "flaky")
    assert [t.state for t in trials] == [COMPLETE, COMPLETE, FAIL, COMPLETE, COMPLETE, COMPLETE]
    bad = trials[2]
    assert bad.user_attrs["fail_reason"] == "RuntimeError: injected failure in evaluation call 3"
    assert "Traceback" in bad.user_attrs["traceback"]
    assert "injected failure in evaluation call 3" in bad.user_attrs["traceback"]
    assert bad.user_attrs["plan"]["layers"]          # the plan that failed is kept with it
    assert "metrics" not in bad.user_attrs
    assert all("metrics" in t.user_attrs for t in trials if t.state == COMPLETE)


def test_consecutive_failures_stop_the_study_and_keep_it(tiny_models, tmp_path):
    from autocomp.errors import StudyError
    from autocomp.study.local import run_local
    from autocomp.study.loop import MAX_CONSECUTIVE_FAILURES

    url = storage_url(tmp_path / "study.db")
    spec = _spec(tiny_models["llama"])
    with pytest.raises(StudyError, match="failed in a row"):
        run_local(spec, url, "broken", 3, progress=False, echo=lambda msg: None,
                  evaluator_factory=lambda s: FlakyEvaluator(s, lambda call: True))
    trials = trials_of(url, "broken")
    # the uniform baselines not reached yet stay queued for the next run
    assert [t.state for t in trials if t.state != WAITING] == [FAIL] * MAX_CONSECUTIVE_FAILURES

    # fixed: the same study resumes and completes
    outcome = run_local(spec, url, "broken", 3, progress=False, echo=lambda msg: None,
                        evaluator_factory=lambda s: FlakyEvaluator(s, lambda call: False))
    assert (outcome.completed, outcome.ran, outcome.failed) == (3, 3, 0)
    trials = trials_of(url, "broken")
    assert count(trials, COMPLETE) == 3 and count(trials, FAIL) == MAX_CONSECUTIVE_FAILURES


# ---- TPE and the Python API against the CLI ----------------------------------------------

@pytest.fixture(scope="module")
def tpe_study(tiny_models, tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("tpe")
    url = storage_url(folder / "study.db")
    model = str(tiny_models["llama"])
    # TPE samples randomly for its first 10 trials (6 of them the uniform baselines) and from its model after
    proc = run_cli(search_args(model, url, "tpe", 12, "--sampler", "tpe", "--max-ppl-increase", "0.1"), folder, cache_dir)
    assert_ok(proc)
    return folder, url, model, cache_dir


def test_tpe_sampler_runs(tpe_study):
    _, url, _, _ = tpe_study
    trials = trials_of(url, "tpe")
    assert [t.state for t in trials] == [COMPLETE] * 12
    study = optuna.load_study(study_name="tpe", storage=open_storage(url))
    assert study.user_attrs["autocomp_spec"]["sampler"] == "tpe"
    assert [bool(t.user_attrs.get("baseline")) for t in trials] == [True] * 6 + [False] * 6
    bits = {v for t in trials for k, v in t.params.items() if k.endswith(":bits")}
    assert bits <= {3, 4, 5, 6, 8, 16} and len(bits) > 1


def test_python_api_matches_the_cli(tpe_study, tmp_path):
    import autocomp
    from autocomp.config.objectives import Budgets

    folder, url, model, cache = tpe_study
    spec = _spec(model, Budgets(max_ppl_increase_pct=0.1), sampler="tpe")
    # the API builds the same spec as the CLI did (same hash): it resumes the study, running 1 more trial
    outcome = autocomp.search(spec, 13, storage=url, study_name="tpe", progress=False)
    assert (outcome.completed, outcome.ran, outcome.failed) == (13, 1, 0)
    assert count(trials_of(url, "tpe"), COMPLETE) == 13

    def cli_json(*args):
        proc = run_cli([*args, "--storage", url, "--study-name", "tpe", "--json"], folder, cache)
        assert_ok(proc)
        return json.loads(proc.stdout)

    def as_json(obj):
        return json.loads(json.dumps(obj))

    front = autocomp.pareto(url, "tpe")
    assert front
    assert as_json([r.to_dict() for r in front]) == cli_json("pareto")
    best = autocomp.recommend(url, "tpe")
    assert best is not None and best.trial in {r.trial for r in front}
    assert as_json(best.to_dict()) == cli_json("recommend", "--by", "search")
    # the CLI search validated its front: plain `recommend` chooses by held-out figures, like the API's
    by_heldout, verdicts = autocomp.recommend_validated(url, "tpe")
    cli = cli_json("recommend")
    assert cli["by"] == "heldout" and cli["verdicts"] == as_json({str(k): v for k, v in verdicts.items()})
    assert cli["trial"] == (by_heldout.trial if by_heldout else None)

    # under other budgets, too
    sizes = sorted(r.metrics["size_mb"] for r in autocomp.pareto(url, "tpe", Budgets()))
    bound = (sizes[0] + sizes[-1]) / 2
    budgets = Budgets(max_size_mb=bound)
    front2 = autocomp.pareto(url, "tpe", budgets)
    assert front2 and all(r.metrics["size_mb"] <= bound for r in front2)
    assert as_json([r.to_dict() for r in front2]) == cli_json("pareto", "--max-size-mb", bound)
    assert as_json(autocomp.recommend(url, "tpe", budgets).to_dict()) == cli_json("recommend", "--max-size-mb", bound,
                                                                              "--by", "search")
