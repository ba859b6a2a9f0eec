"""The sampler contract: every sampler a study can run with passes the same checks.

Samplers (each built by ``autocomp.samplers.make_sampler``, as a study builds it): NSGA-II (the
default), multivariate TPE, the level-switch sampler ``evo``, and the cost-aware wrapper around
NSGA-II and around TPE (a space that searches distillation steps; ``evo`` searches teacher layers only).

They run on a synthetic problem (no model): a real :class:`SearchSpace` over synthetic targets, asked
through ``SearchSpace.suggest`` and ``StudentSpace.suggest`` exactly as a trial asks, scored by an
additive error model and the space's own byte accounting, with the trial's metrics and budget
constraints stored the way the trial loop stores them. The contract:

- **in the space**: every trial has every parameter of the (static) space, each value one of its
  choices; pinned groups keep their pinned values;
- **queued trials first**: enqueued configurations (the uniform baselines) run first, unchanged;
- **a rough history**: failed and pruned trials in the study do not stop sampling;
- **reproducible**: the same seed on a fresh study proposes the same configurations;
- **resumable**: a new sampler over the stored study (a resumed search, another worker) goes on
  from what is stored, and explores: after the baselines it proposes configurations that are not
  uniform, and no more than a few repeats;
- **budgets**: a trial over the size budget is stored infeasible (constraint > 0) and the sampler still
  finds feasible non-uniform configurations.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import optuna
import pytest

from autocomp.config.objectives import Budgets
from autocomp.config.space import SearchSpace
from autocomp.config.spec import StudySpec
from autocomp.evaluators.size import layer_size
from autocomp.inputs.targets import Target
from autocomp.samplers import make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

DENSE_PPL = 10.0
ROLES = (("self_attn.q_proj", 64, 64), ("self_attn.o_proj", 64, 64), ("mlp.up_proj", 128, 64), ("mlp.down_proj", 64, 128))
TARGETS = [Target(f"model.layers.{b}.{role}", b, role.split(".")[-1], "linear", out, inp, f"model.layers.{b}.{role}")
           for b in range(3) for role, out, inp in ROLES]
LAYERS = {"quantization": {"methods": ["rtn"], "bits": [2, 3, 4, 8, 16], "group_size": [32]},
          "sparsity": {"methods": ["magnitude"], "levels": [0.0, 0.5]}}
STUDENT = {"student": {"layers": [1.0, 0.67], "distill": {"steps": [0, 10, 100]}}}
SAMPLERS = {  # name -> (sampler, space)
    "nsga2": ("nsga2", LAYERS),
    "tpe": ("tpe", LAYERS),
    "evo": ("evo", LAYERS),
    "cost-aware(nsga2)": ("nsga2", {**LAYERS, **STUDENT}),
    "cost-aware(tpe)": ("tpe", {**LAYERS, **STUDENT}),
}
PINNED_GROUP = "model.layers.0.self_attn.q_proj"


class Problem:
    """One sampler on the synthetic problem: the space, the spec, the evaluator stand-in."""

    def __init__(self, name: str, seed: int = 0, max_size_mb: float | None = None) -> None:
        sampler, space = SAMPLERS[name]
        self.space = SearchSpace.from_dict({"name": name, "granularity": "layer", **space}, name)
        self.spec = StudySpec(model="synthetic", space=self.space, sampler=sampler, seed=seed,
                              budgets=Budgets(max_size_mb=max_size_mb))
        self.evaluator = SimpleNamespace(targets=TARGETS, dense=SimpleNamespace(perplexity=DENSE_PPL))
        self.pinned = {PINNED_GROUP: {"sparsity": 0.0, "bits": 8}}
        rng = random.Random(7)
        self.sensitivity = {t.name: rng.lognormvariate(0, 1.0) for t in TARGETS}
        self.cost_aware = "cost-aware" in name

    def sampler(self, seed: int | None = None):
        sampler = make_sampler(self.spec, self.evaluator, self.pinned, seed=seed)
        assert (type(sampler).__name__ == "CostAwareSampler") == self.cost_aware
        return sampler

    def study(self, storage=None, name: str = "contract", seed: int | None = None) -> optuna.Study:
        return optuna.create_study(study_name=name, storage=storage, sampler=self.sampler(seed),
                                   directions=["minimize", "minimize"], load_if_exists=True)

    def params(self) -> dict[str, list]:
        """Every parameter of the space and its choices (pinned ones a single value)."""
        out = {}
        for group in self.space.groups(TARGETS):
            for dim, choices in self.space.dimensions():
                out[f"{group}:{dim}"] = [self.pinned[group][dim]] if group in self.pinned else choices
        if self.space.student is not None:
            out.update({f"student:{d}": c for d, c in self.space.student.dimensions()})
        return out

    def objective(self, trial: optuna.Trial, rough: bool = False):
        """The trial as the loop runs it, on the additive error model."""
        per_layer = self.space.suggest(trial, TARGETS, self.pinned)
        steps = self.space.student.suggest(trial)["steps"] if self.space.student is not None else 0
        if rough and trial.number % 7 == 3:
            raise optuna.TrialPruned("screened out")
        if rough and trial.number % 5 == 4:
            raise ValueError("a trial that failed")
        error = sum(self.sensitivity[name] * (4.0 ** -plan.bits + plan.sparsity ** 2) for name, plan in per_layer.items())
        error /= 1 + steps / 100
        size_mb = sum(layer_size(t.out_features, t.in_features, per_layer[t.name]).bytes for t in TARGETS) / 1e6
        ppl = DENSE_PPL * (1 + error)
        metrics = {"perplexity": ppl, "size_mb": size_mb, "seconds": 1.0 + 0.05 * steps,
                   "distill_steps": steps, "seconds_distill": 0.05 * steps}
        trial.set_user_attr("metrics", metrics)
        for key, value in self.spec.budgets.constraints(metrics, DENSE_PPL).items():
            trial.set_constraint(key, value)
        return ppl, size_mb

    def run(self, study: optuna.Study, n: int, rough: bool = False) -> None:
        study.optimize(lambda t: self.objective(t, rough), n_trials=n, catch=(ValueError,))

    def baselines(self) -> list[dict]:
        return self.space.baseline_params(TARGETS, self.pinned)


def configs(study) -> list[str]:
    return [json.dumps(t.params, sort_keys=True) for t in study.trials]


def uniform(problem: Problem, params: dict) -> bool:
    """Whether every unpinned group has the same values."""
    groups = [g for g in problem.space.groups(TARGETS) if g not in problem.pinned]
    dims = [d for d, _ in problem.space.dimensions()]
    return len({tuple(params[f"{g}:{d}"] for d in dims) for g in groups}) == 1


@pytest.fixture(params=list(SAMPLERS))
def problem(request) -> Problem:
    return Problem(request.param)


def test_every_trial_lies_in_the_space_even_after_failed_and_pruned_trials(problem):
    study = problem.study()
    problem.run(study, 40, rough=True)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) >= 5 and states.count(optuna.trial.TrialState.PRUNED) >= 4
    space = problem.params()
    for t in study.trials:
        assert set(t.params) == set(space), t.number
        for key, value in t.params.items():
            assert value in space[key], (t.number, key, value)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) >= 20


def test_queued_trials_run_first_and_unchanged(problem):
    study = problem.study()
    queued = problem.baselines()
    assert len(queued) >= 4
    for params in queued:
        study.enqueue_trial(params, user_attrs={"baseline": True})
    problem.run(study, len(queued) + 3)
    for params, trial in zip(queued, study.trials):
        assert trial.params == params and trial.user_attrs.get("baseline") is True


def test_the_same_seed_proposes_the_same_configurations(problem):
    first, second = problem.study(), problem.study()
    problem.run(first, 25)
    problem.run(second, 25)
    assert configs(first) == configs(second)
    reseeded = Problem(problem_name(problem), seed=1)
    other = reseeded.study()
    reseeded.run(other, 25)
    assert configs(other) != configs(first)


def problem_name(problem: Problem) -> str:
    return problem.space.name


def test_a_new_sampler_resumes_the_stored_study_and_explores(problem, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = problem.study(storage)
    for params in problem.baselines():
        study.enqueue_trial(params, user_attrs={"baseline": True})
    problem.run(study, 12)
    before = configs(study)
    resumed = problem.study(storage, seed=problem.spec.seed + 1)   # another worker, another seed
    problem.run(resumed, 24)
    after = configs(optuna.load_study(study_name="contract", storage=storage))
    assert after[:len(before)] == before and len(after) == 36
    new = [json.loads(c) for c in after[len(problem.baselines()):]]
    assert sum(not uniform(problem, p) for p in new) >= len(new) // 2
    assert len(set(after)) >= len(after) - 4, "the sampler keeps proposing configurations already measured"


def test_a_size_budget_reaches_the_sampler_and_feasible_allocations_are_found(problem):
    dense_mb = sum(t.numel * 2 for t in TARGETS) / 1e6
    budgeted = Problem(problem_name(problem), max_size_mb=0.3 * dense_mb)
    study = budgeted.study()
    for params in budgeted.baselines():
        study.enqueue_trial(params, user_attrs={"baseline": True})
    budgeted.run(study, 40)
    over = [t for t in study.trials if t.values[1] > 0.3 * dense_mb]
    assert over and all(t.system_attrs["constraints:size_mb"] > 0 for t in over)
    feasible = [t for t in study.trials[len(budgeted.baselines()):] if t.values[1] <= 0.3 * dense_mb]
    assert any(not uniform(budgeted, t.params) for t in feasible)
