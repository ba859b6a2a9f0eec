"""The ``student:`` section of a search space: student sizes and distillation settings as dimensions.

::

    student:
      layers: [1.0, 0.75, 0.5]     # floats: fractions of the teacher's; integers: absolute sizes
      ffn: [1.0, 0.75, 0.5]        # FFN intermediate size
      heads: [1.0, 0.5]            # attention (query) heads; kv heads follow (see resolve)
      depth_importance: bi         # fixed settings of StudentSpec
      width_importance: activation
      distill:
        steps: [0, 50, 200]        # lists are searched; scalars are fixed DistillSpec settings
        temperature: [1.0, 2.0]
        alpha: [0.5]
        lr: 1.0e-4
        seq_len: 256
      cost_aware: true             # cheap distillation budgets first (see autocomp.samplers.cost_aware)
      cost_share: 0.5

Every listed value becomes a categorical Optuna parameter ``student:<name>`` (when it has more than
one choice), so the space stays static for NSGA-II. A choice equal to the teacher's size on every
axis is the teacher itself: no student is built, whatever the distillation settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from autocomp.errors import PlanError, SpaceError
from autocomp.students.spec import DEPTH_IMPORTANCE, WIDTH_IMPORTANCE, DistillSpec, StudentSpec

SIZE_AXES = ("layers", "ffn", "heads")
SEARCHED_DISTILL = ("steps", "temperature", "alpha", "lr")
PARAM_PREFIX = "student:"
_KEYS = SIZE_AXES + ("kv_heads", "depth_importance", "width_importance", "distill", "cost_aware", "cost_share")


def is_student_param(name: str) -> bool:
    return name.startswith(PARAM_PREFIX)


def _size_choices(where: str, values: Any) -> tuple[int | float, ...]:
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: expected a non-empty list of sizes, got {values!r}")
    for v in values:
        ok = (isinstance(v, float) and 0 < v <= 1) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        if not ok:
            raise SpaceError(f"{where}: {v!r} is neither a fraction in (0, 1] (a float like 0.75) "
                             "nor an absolute size (an integer >= 1)")
    return tuple(values)


@dataclass(frozen=True)
class StudentSpace:
    """Validated ``student:`` section. Sizes are fractions (float) or absolute (int)."""

    layers: tuple[int | float, ...] = (1.0,)
    ffn: tuple[int | float, ...] = (1.0,)
    heads: tuple[int | float, ...] = (1.0,)
    kv_heads: int | None = None
    depth_importance: str = "bi"
    width_importance: str = "activation"
    distill_choices: tuple[tuple[str, tuple[Any, ...]], ...] = (("steps", (0,)),)
    distill_fixed: tuple[tuple[str, Any], ...] = ()
    cost_aware: bool = True
    cost_share: float = 0.5
    source: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "StudentSpace":
        if not isinstance(data, Mapping):
            raise SpaceError(f"{where}: student: expected a mapping with keys {list(_KEYS)}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise SpaceError(f"{where}: student: unknown key {unknown[0]!r}; allowed keys: {', '.join(_KEYS)}")
        sizes = {axis: _size_choices(f"{where}: student.{axis}", data.get(axis, [1.0])) for axis in SIZE_AXES}
        kv = data.get("kv_heads")
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
            raise SpaceError(f"{where}: student.kv_heads must be a positive integer or absent, got {kv!r}")
        for key, allowed in (("depth_importance", DEPTH_IMPORTANCE), ("width_importance", WIDTH_IMPORTANCE)):
            if data.get(key, allowed[0]) not in allowed:
                raise SpaceError(f"{where}: student.{key} {data[key]!r} is not one of {', '.join(allowed)}")
        distill = data.get("distill", {}) or {}
        if not isinstance(distill, Mapping):
            raise SpaceError(f"{where}: student.distill must be a mapping of DistillSpec settings")
        allowed_distill = [f.name for f in fields(DistillSpec)]
        choices, fixed = [], []
        for key, value in distill.items():
            if key not in allowed_distill:
                raise SpaceError(f"{where}: student.distill: unknown key {key!r}; allowed: {', '.join(allowed_distill)}")
            if isinstance(value, list):
                if key not in SEARCHED_DISTILL:
                    raise SpaceError(f"{where}: student.distill.{key} cannot be searched (a list); searchable: "
                                     f"{', '.join(SEARCHED_DISTILL)}")
                if not value:
                    raise SpaceError(f"{where}: student.distill.{key}: empty list")
                choices.append((key, tuple(value)))
            else:
                fixed.append((key, value))
        if "steps" not in dict(choices) and "steps" not in dict(fixed):
            choices.append(("steps", (0,)))
        space = cls(layers=sizes["layers"], ffn=sizes["ffn"], heads=sizes["heads"], kv_heads=kv,
                    depth_importance=data.get("depth_importance", "bi"),
                    width_importance=data.get("width_importance", "activation"),
                    distill_choices=tuple(choices), distill_fixed=tuple(fixed),
                    cost_aware=bool(data.get("cost_aware", True)), cost_share=data.get("cost_share", 0.5), source=where)
        if not isinstance(data.get("cost_aware", True), bool):
            raise SpaceError(f"{where}: student.cost_aware must be true or false")
        if isinstance(space.cost_share, bool) or not isinstance(space.cost_share, (int, float)) or space.cost_share <= 0:
            raise SpaceError(f"{where}: student.cost_share must be a number > 0, got {space.cost_share!r}")
        for combo in space._distill_combos():  # every distillation choice must make a valid DistillSpec
            try:
                DistillSpec(**combo)
            except (PlanError, TypeError) as exc:
                raise SpaceError(f"{where}: student.distill: {exc}") from None
        return space

    def _distill_combos(self) -> list[dict[str, Any]]:
        import itertools

        keys = [k for k, _ in self.distill_choices]
        return [{**dict(self.distill_fixed), **dict(zip(keys, combo))}
                for combo in itertools.product(*[c for _, c in self.distill_choices])]

    def to_dict(self) -> dict[str, Any]:
        distill = {**dict(self.distill_fixed), **{k: list(v) for k, v in self.distill_choices}}
        return {"layers": list(self.layers), "ffn": list(self.ffn), "heads": list(self.heads), "kv_heads": self.kv_heads,
                "depth_importance": self.depth_importance, "width_importance": self.width_importance,
                "distill": distill, "cost_aware": self.cost_aware, "cost_share": self.cost_share}

    # ---- dimensions -------------------------------------------------------------------------
    def all_dimensions(self) -> list[tuple[str, list]]:
        return [(axis, list(getattr(self, axis))) for axis in SIZE_AXES] + [(k, list(v)) for k, v in self.distill_choices]

    def dimensions(self) -> list[tuple[str, list]]:
        """Searched dimensions (more than one choice), as (name, choices); params are ``student:<name>``."""
        return [(name, choices) for name, choices in self.all_dimensions() if len(choices) > 1]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Every dimension's value for ``trial`` (single-choice dimensions without asking)."""
        searched = dict(self.dimensions())
        return {name: (trial.suggest_categorical(PARAM_PREFIX + name, choices) if name in searched else choices[0])
                for name, choices in self.all_dimensions()}

    def values_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {name: params.get(PARAM_PREFIX + name, choices[0]) for name, choices in self.all_dimensions()}

    def largest_cheapest(self) -> dict[str, Any]:
        """The values of the uniform baselines: every size at its largest choice, the fewest steps."""
        return {"layers": max(self.layers, key=_size_key), "ffn": max(self.ffn, key=_size_key),
                "heads": max(self.heads, key=_size_key), "steps": min(dict(self.distill_choices).get("steps", (0,))),
                **{k: v[0] for k, v in self.distill_choices if k != "steps"}}

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna params (searched dimensions only) for ``values``."""
        return {PARAM_PREFIX + name: values[name] for name, _ in self.dimensions()}

    def sweep_values(self) -> list[dict[str, Any]]:
        """One student per size choice (the other axes at their largest), with the fewest non-zero
        steps: the cheap first look at every size, enqueued after the uniform baselines."""
        base = self.largest_cheapest()
        steps = sorted(dict(self.distill_choices).get("steps", (0,)))
        nonzero = [s for s in steps if s > 0]
        base["steps"] = nonzero[0] if nonzero else steps[0]
        out = []
        for axis in SIZE_AXES:
            for choice in getattr(self, axis):
                if choice != base[axis]:
                    out.append({**base, axis: choice})
        return out

    # ---- resolving against a teacher ----------------------------------------------------------
    def resolve(self, values: Mapping[str, Any], dims: Mapping[str, int]) -> StudentSpec | None:
        """The StudentSpec for ``values`` on a teacher with ``dims`` (``teacher_dims``), or None when
        every size equals the teacher's (no student)."""
        layers = _absolute(values["layers"], dims["layers"], 1)
        ffn = _absolute(values["ffn"], dims["ffn"], 8 if dims["ffn"] >= 64 else 1)
        heads = _absolute(values["heads"], dims["heads"], 1)
        kv = self.kv_heads if self.kv_heads is not None else dims["kv_heads"]
        if heads < kv:
            kv = heads                      # fewer heads than kv groups: one query head per kept group
        else:
            heads = heads - heads % kv      # keep whole groups of query heads
        if (layers, ffn, heads, kv) == (dims["layers"], dims["ffn"], dims["heads"], dims["kv_heads"]):
            return None
        distill = {**dict(self.distill_fixed), **{k: values[k] for k, _ in self.distill_choices}}
        return StudentSpec(layers=layers, ffn=ffn, heads=heads, kv_heads=kv, depth_importance=self.depth_importance,
                           width_importance=self.width_importance, distill=DistillSpec(**distill))

    def check_teacher(self, config: Any) -> None:
        """SpaceError now, rather than failed trials later, for sizes this teacher cannot take."""
        from autocomp.students.prune import resolve_student, teacher_dims

        try:
            dims = teacher_dims(config)
        except PlanError as exc:
            raise SpaceError(f"{self.source}: student: {exc}") from None
        for axis in SIZE_AXES:
            for choice in getattr(self, axis):
                values = {**self.largest_cheapest(), axis: choice}
                spec = self.resolve(values, dims)
                if spec is None:
                    continue
                try:
                    resolve_student(config, spec)
                except PlanError as exc:
                    raise SpaceError(f"{self.source}: student.{axis} {choice!r}: {exc}") from None


def _size_key(v: int | float) -> float:
    return float(v) if isinstance(v, float) else 1e9 + v   # absolute sizes sort after fractions


def _absolute(value: int | float, teacher: int, multiple: int) -> int:
    if isinstance(value, int):
        return value
    size = round(value * teacher / multiple) * multiple
    return max(multiple, min(teacher, size))

