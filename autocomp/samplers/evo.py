"""Level-switch mutation around the feasible front: the ``evo`` sampler (after EvoPress).

EvoPress (Sieberling et al., 2024, "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search") searches per-layer compression levels with one mutation: move one layer up a
level and others down until the model is no larger than its parent, so every child is a candidate at
the parent's budget. It finds better allocations than error-additive heuristics because it measures
each candidate end to end instead of assuming that layer errors add up.

Here the same mutation drives a multi-objective Optuna sampler:

* every group of the search space gets a *ladder*: its choices ordered by bytes (pinned groups are
  left alone);
* the parent of a trial is, half of the time, the feasible trial best on the first objective (under
  a size budget: the best model that fits, the point a user is most likely to take), and otherwise
  drawn uniformly from the feasible Pareto front of the completed trials (so every size along the
  front is refined too);
* the child applies 1 to ``max_switches`` level switches: one group one rung up, then other groups
  one rung down until the child's bytes are at most the parent's;
* which groups move is uniform at random, or, given the sensitivity pass's table (``errors``), half
  of the time drawn in proportion to the error a rung saves per byte (for a raise) and to the bytes a
  rung frees per unit of error (for a lowering): the table's guess guides, the measurement decides;
* a child equal to any earlier trial is redrawn; while there is no feasible completed trial yet, the
  sampler draws uniformly at random (``RandomSampler``).

Enqueued trials (baselines, sensitivity-seeded allocations) keep their fixed parameters: seeding the
study with the sensitivity pass's allocations gives the mutation a good start.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Sequence

import optuna

from autocomp.multiobjective import non_dominated
from autocomp.config.space import SearchSpace
from autocomp.inputs.targets import Target

Ladder = list[tuple[dict[str, Any], float]]  # (values of the group's dimensions, bytes), by bytes


def ladder_errors(ladders: Mapping[str, Ladder], table: Mapping[str, Mapping[str, Mapping[str, float]]]
                  ) -> dict[str, list[float]]:
    """The sensitivity table's error of every rung, aligned with ``ladders``."""
    from autocomp.sensitivity.table import choice_label

    return {g: [table[g][choice_label(values)]["error"] for values, _ in rungs] for g, rungs in ladders.items()}


def choice_ladders(space: SearchSpace, targets: Sequence[Target],
                   pinned: Mapping[str, Any] | None = None) -> dict[str, Ladder]:
    """Each unpinned group's choices ordered by their bytes (ties keep the space's order)."""
    ladders: dict[str, Ladder] = {}
    for group, members in space.groups(targets).items():
        if pinned and group in pinned:
            continue
        rungs = [(values, space.group_bytes(members, values)) for values in space.group_choices()]
        ladders[group] = sorted(rungs, key=lambda r: r[1])
    return ladders


class LevelSwitchSampler(optuna.samplers.BaseSampler):
    """Proposes level-switch mutations of feasible front members. ``feasible(frozen_trial) -> bool``
    says which completed trials meet the budgets."""

    def __init__(self, ladders: Mapping[str, Ladder], feasible: Callable[[Any], bool], seed: int = 0,
                 errors: Mapping[str, Sequence[float]] | None = None, max_switches: int = 3,
                 max_redraws: int = 32, guided_share: float = 0.5, elite_share: float = 0.5) -> None:
        self.ladders = dict(ladders)
        self.elite_share = elite_share
        self.errors = {g: list(errors[g]) for g in self.ladders} if errors else None
        self.guided_share = guided_share
        self.feasible = feasible
        self.max_switches = max_switches
        self.max_redraws = max_redraws
        self._rng = random.Random(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._proposals: dict[int, dict[str, Any] | None] = {}

    # --- the BaseSampler interface ------------------------------------------------------------
    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name: str, param_distribution) -> Any:
        if trial.number not in self._proposals:
            self._proposals[trial.number] = self._propose(study)
        proposal = self._proposals[trial.number]
        if proposal is not None and param_name in proposal and proposal[param_name] in param_distribution.choices:
            return proposal[param_name]
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._fallback.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._proposals.pop(trial.number, None)
        self._fallback.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._rng = random.Random()
        self._fallback.reseed_rng()

    # --- the mutation ---------------------------------------------------------------------------
    def _rungs(self, params: Mapping[str, Any]) -> dict[str, int] | None:
        """The rung of every laddered group in a trial's params, or None if some group is missing."""
        out = {}
        for group, ladder in self.ladders.items():
            values = {dim: params.get(f"{group}:{dim}") for dim in ladder[0][0]}
            index = next((i for i, (v, _) in enumerate(ladder) if v == values), None)
            if index is None:
                return None
            out[group] = index
        return out

    def _params(self, rungs: Mapping[str, int]) -> dict[str, Any]:
        return {f"{g}:{dim}": value for g, i in rungs.items() for dim, value in self.ladders[g][i][0].items()}

    def _bytes(self, rungs: Mapping[str, int]) -> float:
        return sum(self.ladders[g][i][1] for g, i in rungs.items())

    def _propose(self, study) -> dict[str, Any] | None:
        trials = study.get_trials(deepcopy=False)
        # compared on the laddered groups only: a pinned group's one value is not part of a child
        seen = {tuple(sorted(rungs.items())) for rungs in map(self._rungs, (t.params for t in trials)) if rungs is not None}
        points = []
        for t in trials:
            if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None and self.feasible(t):
                rungs = self._rungs(t.params)
                if rungs is not None:
                    points.append((rungs, t.values))
        parents = non_dominated([(values, rungs) for rungs, values in points])
        if not parents or not self.ladders:
            return None
        elite = min(points, key=lambda p: tuple(p[1]))[0]
        for _ in range(self.max_redraws):
            parent = elite if self._rng.random() < self.elite_share else self._rng.choice(parents)
            child = self.mutate(parent)
            if tuple(sorted(child.items())) not in seen:
                return self._params(child)
        return None

    def mutate(self, parent: Mapping[str, int]) -> dict[str, int]:
        """1..max_switches level switches; the result is never larger than ``parent``."""
        child = dict(parent)
        budget = self._bytes(parent)
        groups = list(self.ladders)
        for _ in range(self._rng.randint(1, self.max_switches)):
            up = [g for g in groups if child[g] + 1 < len(self.ladders[g])]
            if not up:
                break
            raised = self._pick(up, [self._rate(g, child[g], child[g] + 1) for g in up])
            child[raised] += 1
            while self._bytes(child) > budget:
                down = [g for g in groups if g != raised and child[g] > 0]
                if not down:  # nothing else can pay for it: undo
                    child[raised] -= 1
                    break
                lowered = self._pick(down, [1.0 / self._rate(g, child[g] - 1, child[g]) for g in down])
                child[lowered] -= 1
        return child

    def _rate(self, group: str, low: int, high: int) -> float:
        """Error saved per byte going from rung ``low`` to ``high`` (1 without a table)."""
        if self.errors is None:
            return 1.0
        saved = max(self.errors[group][low] - self.errors[group][high], 0.0)
        cost = max(self.ladders[group][high][1] - self.ladders[group][low][1], 1e-9)
        return saved / cost + 1e-12

    def _pick(self, groups: list[str], weights: list[float]) -> str:
        if self.errors is None or self._rng.random() >= self.guided_share:
            return self._rng.choice(groups)
        return self._rng.choices(groups, weights=weights)[0]

