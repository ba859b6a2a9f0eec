"""The level-switch (``evo``) sampler: children never outgrow their parent, come from the feasible
front, are never repeated, beat random sampling at a fixed budget on a known problem, and drive a
real study end to end."""

from __future__ import annotations

import random

import optuna
import pytest

from autocomp.samplers.evo import LevelSwitchSampler, choice_ladders

optuna.logging.set_verbosity(optuna.logging.WARNING)

BITS = [2, 3, 4, 8]


def _toy(n_groups: int, seed: int = 0):
    """Groups of different sizes and sensitivities; error of a group at b bits ~ s * 4^-b (additive)."""
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 4, 8]) for _ in range(n_groups)]
    sens = [rng.lognormvariate(0, 1.5) for _ in range(n_groups)]
    ladders = {f"g{i}": [({"bits": b}, float(sizes[i] * b)) for b in BITS] for i in range(n_groups)}
    return ladders, sizes, sens


def _objective_factory(sizes, sens, budget):
    def objective(trial):
        total_err = total_bytes = 0.0
        for i, (size, s) in enumerate(zip(sizes, sens)):
            b = trial.suggest_categorical(f"g{i}:bits", BITS)
            total_err += s * size * 4.0 ** (-b)
            total_bytes += size * b
        feasible = total_bytes <= budget
        trial.set_user_attr("metrics", {"feasible": feasible})
        return total_err, total_bytes
    return objective


def _feasible(trial) -> bool:
    return bool(trial.user_attrs.get("metrics", {}).get("feasible"))


def _best_at_budget(study, budget) -> float:
    return min(t.values[0] for t in study.trials if t.values and t.values[1] <= budget)


def test_mutation_never_grows_and_moves():
    ladders, _, _ = _toy(12)
    sampler = LevelSwitchSampler(ladders, _feasible, seed=1)
    rng = random.Random(0)
    moved = 0
    for _ in range(200):
        parent = {g: rng.randrange(len(BITS)) for g in ladders}
        child = sampler.mutate(parent)
        assert set(child) == set(parent)
        assert sampler._bytes(child) <= sampler._bytes(parent)
        assert all(0 <= child[g] < len(BITS) for g in child)
        moved += child != parent
    assert moved > 150
    # a model at the top of every ladder can only go down; at the bottom nothing can pay for a raise
    top = {g: len(BITS) - 1 for g in ladders}
    assert sampler.mutate(top) == top
    bottom = {g: 0 for g in ladders}
    assert sampler._bytes(sampler.mutate(bottom)) == sampler._bytes(bottom)


def _run(sampler, sizes, sens, budget, n_trials=120) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for b in BITS:  # the uniform baselines come first, as in a real study
        study.enqueue_trial({f"g{i}:bits": b for i in range(len(sizes))})
    study.optimize(_objective_factory(sizes, sens, budget), n_trials=n_trials)
    return study


def test_evo_beats_random_at_a_fixed_budget():
    """On an additive problem whose optimum is non-uniform, mutating the front from the uniform
    starts finds a lower error at the 4-bit budget than random sampling with the same trial count;
    guided by a sensitivity table that is wrong by a factor of e per entry (log-normal noise), lower still."""
    ladders, sizes, sens = _toy(24, seed=4)
    budget = sum(s * 4 for s in sizes)
    uniform4 = sum(s * z * 4.0 ** -4 for s, z in zip(sens, sizes))
    rng = random.Random(0)
    noisy = {f"g{i}": [sens[i] * sizes[i] * 4.0 ** -b * rng.lognormvariate(0, 1.0) for b in BITS] for i in range(len(sizes))}
    found = {}
    for name, sampler in [("random", optuna.samplers.RandomSampler(seed=0)),
                          ("evo", LevelSwitchSampler(ladders, _feasible, seed=0)),
                          ("guided", LevelSwitchSampler(ladders, _feasible, seed=0, errors=noisy))]:
        study = _run(sampler, sizes, sens, budget)
        found[name] = _best_at_budget(study, budget) / uniform4
        keys = [tuple(sorted(t.params.items())) for t in study.trials]
        if name != "random":
            assert len(keys) == len(set(keys)), "a configuration was proposed twice"
    assert found["evo"] < found["random"] <= 1.0, found
    assert found["guided"] < 0.8 * found["random"], found


def test_falls_back_to_random_without_a_feasible_trial():
    ladders, sizes, sens = _toy(6)
    sampler = LevelSwitchSampler(ladders, lambda t: False, seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(_objective_factory(sizes, sens, 1e9), n_trials=10)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) > 1


def test_choice_ladders_order_by_bytes_and_skip_pinned(tiny_models):
    from autocomp.inputs.models import load_model
    from autocomp.config.space import SearchSpace
    from autocomp.inputs.targets import find_targets

    space = SearchSpace.from_dict({"name": "m", "granularity": "role",
                                   "sparsity": {"levels": [0.0, 0.5]},
                                   "quantization": {"methods": ["rtn"], "bits": [4, 8, 16], "group_size": [32]}}, "m")
    targets = space.select_targets(find_targets(load_model(str(tiny_models["llama"])).model))
    ladders = choice_ladders(space, targets, pinned={"role.q": {"sparsity": 0.0, "bits": 16}})
    assert "role.q" not in ladders and len(ladders) == 6
    for rungs in ladders.values():
        assert len(rungs) == 6
        sizes = [b for _, b in rungs]
        assert sizes == sorted(sizes)
        assert rungs[-1][0] == {"sparsity": 0.0, "bits": 16}


def test_evo_study_end_to_end(tiny_models, tmp_path):
    """sampler='evo' on a GPTQ bits space under a size budget: after the baselines, every trial is a
    new configuration no larger than the largest feasible one."""
    from autocomp.inputs.data import WindowSpec
    from autocomp.config.objectives import Budgets
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec
    from autocomp.study.local import run_local

    space = SearchSpace.from_dict({"name": "bits", "granularity": "layer",
                                   "quantization": {"methods": ["rtn"], "bits": [2, 4, 8], "group_size": [32]}}, "b")
    base = StudySpec(model=str(tiny_models["llama"]), space=space, eval_windows=WindowSpec(2, 32),
                     calib_windows=WindowSpec(2, 32, 0))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    probe = run_local(base, url, "probe", 3, progress=False, echo=lambda m: None)
    assert probe.failed == 0
    sizes = sorted(t.user_attrs["metrics"]["size_mb"] for t in optuna.load_study(study_name="probe", storage=url).trials)
    budget = (sizes[1] + sizes[2]) / 2  # between uniform 4-bit and 8-bit
    spec = StudySpec(**{**base.__dict__, "sampler": "evo", "budgets": Budgets(max_size_mb=budget)})
    outcome = run_local(spec, url, "evo", 12, progress=False, echo=lambda m: None)
    assert (outcome.completed, outcome.failed) == (12, 0)
    trials = optuna.load_study(study_name="evo", storage=url).trials
    mutated = [t for t in trials if not t.user_attrs.get("baseline")]
    assert len(mutated) == 9
    keys = [tuple(sorted(t.params.items())) for t in trials]
    assert len(keys) == len(set(keys))
    largest_feasible = max(t.user_attrs["metrics"]["size_mb"] for t in trials if t.user_attrs["metrics"]["size_mb"] <= budget)
    for t in mutated:
        assert t.user_attrs["metrics"]["size_mb"] <= largest_feasible + 1e-9
        assert len(set(t.params.values())) > 1  # mixed, not a uniform configuration


@pytest.mark.parametrize("bad", ["evolution", "NSGA2"])
def test_unknown_sampler_is_refused(bad, tiny_models):
    from autocomp.errors import StudyError
    from autocomp.config.space import SearchSpace
    from autocomp.config.spec import StudySpec

    space = SearchSpace.from_dict({"name": "b", "quantization": {"methods": ["rtn"], "bits": [4, 8]}}, "b")
    with pytest.raises(StudyError, match="evo"):
        StudySpec(model=str(tiny_models["llama"]), space=space, sampler=bad)
