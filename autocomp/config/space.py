"""Search spaces: YAML files under ``autocomp/config/spaces/`` loaded into typed dimensions.

This module is the only caller of ``trial.suggest_*``. Format (every key but ``name`` optional)::

    name: mixed
    description: per-layer sparsity and bit width
    targets:
      include: ["re:.*"]          # keys over decoder-block layers (exact names or re: patterns)
      exclude: []                 # removed after include
      embeddings: false           # also search the embedding / LM head (one group of its own)
    granularity: layer            # layer | block | role | uniform: which layers share one choice
    sparsity:
      methods: [magnitude, wanda] # pruners to choose from
      levels: [0.0, 0.25, 0.5, "2:4"]   # unstructured fractions and/or N:M patterns
    quantization:
      methods: [rtn]
      bits: [3, 4, 8, 16]          # 16 = not quantized
      group_size: [128]            # -1 = per output channel
      symmetric: [false]
    baselines: true                # enqueue the uniform configurations first
    deploy_target: vllm            # optional: vllm | llamacpp | torch (autocomp.config.deploy): only
                                   # choices that engine holds; fused layers share one choice
    student:                       # optional: student sizes and distillation (autocomp.students.space)
      layers: [1.0, 0.75, 0.5]
      distill: {steps: [0, 50]}

Unknown keys and bad values raise :class:`~autocomp.errors.SpaceError` naming the file, the key and
what is allowed. A group's parameters are always suggested (the space is static, which NSGA-II
needs), even where they do not matter for a trial (a pruner at sparsity 0); such plans are
canonicalised before use so equivalent trials share cached layers.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from autocomp.errors import PlanError, SpaceError
from autocomp.config.deploy import DEPLOY_TARGETS, DeployTarget
from autocomp.config.plan import ALLOWED_BITS, DENSE_BITS, PER_CHANNEL, LayerPlan, compose_method, parse_nm
from autocomp.students.space import StudentSpace, is_student_param
from autocomp.inputs.targets import Target

GRANULARITIES = ("layer", "block", "role", "uniform")
BUILTIN_DIR = Path(__file__).resolve().parent / "spaces"
_TOP_KEYS = ("name", "description", "targets", "granularity", "sparsity", "quantization", "baselines", "student",
             "deploy_target", "presets")
_TARGET_KEYS = ("include", "exclude", "embeddings")
_SPARSITY_KEYS = ("methods", "levels")
_QUANT_KEYS = ("methods", "bits", "group_size", "symmetric")
MAX_PRODUCT_BASELINES = 16


def _check_keys(where: str, data: Any, allowed: Sequence[str]) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpaceError(f"{where}: expected a mapping with keys {list(allowed)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SpaceError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
    return data


def _as_list(where: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise SpaceError(f"{where}: expected a non-empty list, got {value!r}")
    return value


def yaml_error(exc: Exception) -> str:
    """A YAML parse error as one line: ``YAML syntax error at line L, column C: problem (context)``
    (PyYAML's own message spans several lines with the offending source quoted)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    cmark = getattr(exc, "context_mark", None)
    if context:
        context = " ".join(str(context).split())
        if cmark is not None:
            context += f" started at line {cmark.line + 1}, column {cmark.column + 1}"
        problem += f" ({context})"
    return f"YAML syntax error{where}: {problem}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. ``to_dict`` gives the canonical form stored with a study."""

    name: str
    description: str = ""
    include: tuple[str, ...] = ("re:.*",)
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    granularity: str = "layer"
    prune_methods: tuple[str, ...] = ("magnitude",)
    levels: tuple[float | str, ...] = (0.0,)
    quant_methods: tuple[str, ...] = ("rtn",)
    bits: tuple[int, ...] = (DENSE_BITS,)
    group_sizes: tuple[int, ...] = (128,)
    symmetric: tuple[bool, ...] = (False,)
    baselines: bool = True
    student: StudentSpace | None = None
    deploy_target: str | None = None
    presets: tuple[str, ...] = ()   # llama.cpp presets evaluated as baselines (spaces of methods ggml)
    source: str = field(default="", compare=False)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, where: str) -> "SearchSpace":
        from autocomp.compressors.registry import available_compressors

        top = _check_keys(where, data, _TOP_KEYS)
        name = top.get("name")
        if not isinstance(name, str) or not name:
            raise SpaceError(f"{where}: 'name' must be a non-empty string")
        tgt = _check_keys(f"{where}: targets", top.get("targets"), _TARGET_KEYS)
        gran = top.get("granularity", "layer")
        if gran not in GRANULARITIES:
            raise SpaceError(f"{where}: granularity {gran!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")
        sp = _check_keys(f"{where}: sparsity", top.get("sparsity"), _SPARSITY_KEYS)
        qu = _check_keys(f"{where}: quantization", top.get("quantization"), _QUANT_KEYS)
        pruners, quantizers = available_compressors("prune"), available_compressors("quant")
        prune_methods = tuple(_as_list(f"{where}: sparsity.methods", sp.get("methods", ["magnitude"])))
        for m in prune_methods:
            if m not in pruners:
                raise SpaceError(f"{where}: sparsity.methods: {m!r} is not a pruner; allowed: {', '.join(pruners)}")
        levels = []
        for lv in _as_list(f"{where}: sparsity.levels", sp.get("levels", [0.0])):
            if isinstance(lv, str):
                try:
                    parse_nm(lv)
                except PlanError:
                    raise SpaceError(f"{where}: sparsity.levels: {lv!r} is neither a fraction in [0, 1) nor an N:M pattern like '2:4'") from None
                levels.append(lv)
            elif isinstance(lv, (int, float)) and not isinstance(lv, bool) and 0 <= lv < 1:
                levels.append(float(lv))
            else:
                raise SpaceError(f"{where}: sparsity.levels: {lv!r} is neither a fraction in [0, 1) nor an N:M pattern like '2:4'")
        quant_methods = tuple(_as_list(f"{where}: quantization.methods", qu.get("methods", ["rtn"])))
        for m in quant_methods:
            if m not in quantizers:
                raise SpaceError(f"{where}: quantization.methods: {m!r} is not a quantizer; allowed: {', '.join(quantizers)}")
        bits = tuple(_as_list(f"{where}: quantization.bits", qu.get("bits", [DENSE_BITS])))
        for b in bits:
            if b not in ALLOWED_BITS or isinstance(b, bool):
                raise SpaceError(f"{where}: quantization.bits: {b!r} is not allowed; allowed: {list(ALLOWED_BITS)}")
        groups = tuple(_as_list(f"{where}: quantization.group_size", qu.get("group_size", [128])))
        for g in groups:
            if not isinstance(g, int) or isinstance(g, bool) or (g != PER_CHANNEL and g < 1):
                raise SpaceError(f"{where}: quantization.group_size: {g!r} must be a positive integer or -1 (per channel)")
        sym = tuple(_as_list(f"{where}: quantization.symmetric", qu.get("symmetric", [False])))
        for s in sym:
            if not isinstance(s, bool):
                raise SpaceError(f"{where}: quantization.symmetric: {s!r} must be true or false")
        include = tuple(_as_list(f"{where}: targets.include", tgt.get("include", ["re:.*"])))
        exclude_raw = tgt.get("exclude", []) or []
        if not isinstance(exclude_raw, list):
            raise SpaceError(f"{where}: targets.exclude: expected a list, got {exclude_raw!r}")
        exclude = tuple(exclude_raw)
        for key in include + exclude:
            if not isinstance(key, str):
                raise SpaceError(f"{where}: targets: {key!r} must be a layer name or 're:' pattern (a string)")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise SpaceError(f"{where}: targets: {key!r} is not a valid regular expression ({exc})") from None
        for flag in ("embeddings",):
            if not isinstance(tgt.get(flag, False), bool):
                raise SpaceError(f"{where}: targets.{flag} must be true or false")
        if not isinstance(top.get("baselines", True), bool):
            raise SpaceError(f"{where}: baselines must be true or false")
        student = StudentSpace.from_dict(top["student"], where) if top.get("student") is not None else None
        deploy = top.get("deploy_target")
        if deploy is not None and deploy not in DEPLOY_TARGETS:
            raise SpaceError(f"{where}: deploy_target {deploy!r} is not one of {', '.join(DEPLOY_TARGETS)}")
        presets = tuple(str(p).upper() for p in _as_list(f"{where}: presets", top["presets"])) if "presets" in top else ()
        if presets:
            from autocomp.compressors.ggml import GGML_METHODS, PRESET_BASELINES

            wrong = [p for p in presets if p not in PRESET_BASELINES]
            if wrong:
                raise SpaceError(f"{where}: presets {wrong} are not llama.cpp presets of K-quant types; use "
                                 f"{', '.join(PRESET_BASELINES)}")
            if not set(quant_methods) <= set(GGML_METHODS):
                raise SpaceError(f"{where}: presets are llama.cpp's own types: they need quantization.methods "
                                 f"{list(GGML_METHODS)}")
        space = cls(
            name=name, description=str(top.get("description", "")), include=include, exclude=exclude,
            embeddings=bool(tgt.get("embeddings", False)), granularity=gran, prune_methods=prune_methods,
            levels=tuple(levels), quant_methods=quant_methods, bits=bits, group_sizes=groups, symmetric=sym,
            baselines=bool(top.get("baselines", True)), student=student, deploy_target=deploy, presets=presets,
            source=where,
        )
        problems = (space.deploy or DEPLOY_TARGETS["torch"]).space_problems(space)
        if problems:
            raise SpaceError(f"{where}: deploy_target {deploy or '(none)'} cannot hold these choices: "
                             f"{'; '.join(problems)}")
        return space

    @property
    def deploy(self) -> DeployTarget | None:
        return DEPLOY_TARGETS[self.deploy_target] if self.deploy_target is not None else None

    @classmethod
    def load(cls, ref: str | Path) -> "SearchSpace":
        """Load a YAML file, or a built-in space by name (``mixed`` -> ``autocomp/config/spaces/mixed.yaml``)."""
        path = Path(ref)
        if not path.exists() and not str(ref).endswith((".yaml", ".yml")):
            builtin = BUILTIN_DIR / f"{ref}.yaml"
            if builtin.exists():
                path = builtin
        if not path.exists():
            names = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
            raise SpaceError(f"search space {ref} not found; give a YAML file or a built-in name ({names})")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SpaceError(f"{path}: {yaml_error(exc)}") from None
        except UnicodeDecodeError as exc:
            raise SpaceError(f"{path}: not UTF-8 text (byte {exc.start}); a search space is a YAML text file") from None
        except OSError as exc:
            raise SpaceError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "targets": {"include": list(self.include), "exclude": list(self.exclude), "embeddings": self.embeddings},
            "granularity": self.granularity,
            "sparsity": {"methods": list(self.prune_methods), "levels": list(self.levels)},
            "quantization": {"methods": list(self.quant_methods), "bits": list(self.bits),
                             "group_size": list(self.group_sizes), "symmetric": list(self.symmetric)},
            "baselines": self.baselines,
        } | ({"student": self.student.to_dict()} if self.student is not None else {}) | (
            {"deploy_target": self.deploy_target} if self.deploy_target is not None else {}) | (
            {"presets": list(self.presets)} if self.presets else {})

    # ---- binding to a model --------------------------------------------------------------
    def select_targets(self, targets: Sequence[Target]) -> list[Target]:
        """The targets this space searches over, in model order. Raises SpaceError on a key matching nothing."""

        def matches(key: str, t: Target) -> bool:
            return bool(re.search(key[3:], t.name)) if key.startswith("re:") else key == t.name

        block = [t for t in targets if t.in_blocks]
        chosen: list[Target] = []
        for key in self.include:
            hits = [t for t in block if matches(key, t)]
            if not hits:
                raise SpaceError(f"{self.source}: targets.include {key!r} matches no layer (layers look like {block[0].name if block else '?'})")
            chosen.extend(t for t in hits if t not in chosen)
        for key in self.exclude:
            chosen = [t for t in chosen if not matches(key, t)]
        chosen = [t for t in block if t in chosen]
        if self.embeddings:
            chosen.extend(t for t in targets if not t.in_blocks)
        if not chosen:
            raise SpaceError(f"{self.source}: no layer left to search after include/exclude")
        problems = self.deploy.target_problems(self, chosen) if self.deploy is not None else []
        if problems:
            raise SpaceError(f"{self.source}: deploy_target {self.deploy_target} cannot hold {'; '.join(problems)}")
        for lv in self.levels:
            nm = parse_nm(lv) if isinstance(lv, str) else None
            if nm:
                bad = [t for t in chosen if t.in_features % nm[1]]
                if bad:
                    raise SpaceError(f"{self.source}: level {lv!r} needs input sizes divisible by {nm[1]}; "
                                     f"{bad[0].name} has {bad[0].in_features} inputs (exclude it in targets.exclude)")
        return chosen

    def groups(self, targets: Sequence[Target]) -> dict[str, list[Target]]:
        """Group key -> targets sharing one choice, following ``granularity``; the embedding is its own
        group; layers the deploy target fuses (q/k/v, gate/up for vLLM) share one group per block (or role)."""
        out: dict[str, list[Target]] = {}
        for t in targets:
            fused = self.deploy.fused_key(t.role) if self.deploy is not None and t.in_blocks else None
            if not t.in_blocks:
                key = f"{t.role}"
            elif self.granularity == "layer":
                key = t.name if fused is None else f"block.{t.block}.{fused}"
            elif self.granularity == "block":
                key = f"block.{t.block}"
            elif self.granularity == "role":
                key = f"role.{t.role if fused is None else fused}"
            else:
                key = "all"
            out.setdefault(key, []).append(t)
        return out

    def dimensions(self) -> list[tuple[str, list]]:
        """The searched dimensions (name, choices): those with more than one choice."""
        dims = [("sparsity", list(self.levels)), ("prune", list(self.prune_methods)), ("bits", list(self.bits)),
                ("quant", list(self.quant_methods)), ("group_size", list(self.group_sizes)), ("symmetric", list(self.symmetric))]
        return [(name, choices) for name, choices in dims if len(choices) > 1]

    def group_choices(self) -> list[dict[str, Any]]:
        """Every combination of the searched dimensions' values (one group's possible choices)."""
        dims = self.dimensions()
        return [dict(zip([d for d, _ in dims], combo)) for combo in itertools.product(*[c for _, c in dims])]

    def suggest(self, trial: Any, targets: Sequence[Target],
                pinned: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, LayerPlan]:
        """Ask ``trial`` for every group's choices and return the per-target plan. ``pinned`` groups
        have their values fixed (a one-value categorical, so the space stays static)."""
        plan: dict[str, LayerPlan] = {}
        pinned = pinned or {}
        for group, members in self.groups(targets).items():
            fixed = pinned.get(group)
            values = {dim: trial.suggest_categorical(f"{group}:{dim}", [fixed[dim]] if fixed else choices)
                      for dim, choices in self.dimensions()}
            layer_plan = self.group_plan(members, values)
            for t in members:
                plan[t.name] = layer_plan
        return plan

    def group_plan(self, members: Sequence[Target], values: Mapping[str, Any]) -> LayerPlan:
        """The LayerPlan a group's members take for ``values`` (data-free methods when a member has
        no input statistics, like the embedding)."""
        return self.layer_plan(values, data_free_only=any(t.stats_module is None for t in members))

    def group_bytes(self, members: Sequence[Target], values: Mapping[str, Any]) -> float:
        """Accounted bytes of a group's members under ``values``."""
        from autocomp.evaluators.size import layer_size

        plan = self.group_plan(members, values)
        return float(sum(layer_size(t.out_features, t.in_features, plan).bytes for t in members))

    def layer_plan(self, values: Mapping[str, Any], data_free_only: bool = False) -> LayerPlan:
        """Canonical LayerPlan for one group's values (missing dimensions take the space's only choice)."""
        level = values.get("sparsity", self.levels[0])
        pruner = values.get("prune", self.prune_methods[0])
        bits = values.get("bits", self.bits[0])
        quant = values.get("quant", self.quant_methods[0])
        gs = values.get("group_size", self.group_sizes[0])
        sym = values.get("symmetric", self.symmetric[0])
        sparse = isinstance(level, str) or level > 0
        if data_free_only and sparse:
            from autocomp.compressors.registry import get_compressor

            if get_compressor(pruner).needs_calibration:
                pruner = "magnitude"
        if data_free_only and bits < DENSE_BITS:
            from autocomp.compressors.registry import get_compressor

            if get_compressor(quant).needs_calibration:  # e.g. gptq on an untied input embedding
                quant = get_compressor(quant).data_free_fallback
        if bits == DENSE_BITS:
            gs, sym = 128, False
        return LayerPlan(
            method=compose_method(pruner if sparse else None, quant if bits < DENSE_BITS else None),
            sparsity=0.0 if isinstance(level, str) else float(level),
            pattern=level if isinstance(level, str) else "unstructured",
            bits=bits, group_size=gs, symmetric=sym,
        )

    def baseline_params(self, targets: Sequence[Target],
                        pinned: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Optuna params of the uniform configurations: every level x every bit width (first method,
        group size and symmetry), or only the two axes when that product is larger than 16."""
        if not self.baselines:
            return []
        pairs = list(itertools.product(self.levels, self.bits))
        if len(pairs) > MAX_PRODUCT_BASELINES:
            pairs = [(lv, DENSE_BITS if DENSE_BITS in self.bits else self.bits[-1]) for lv in self.levels]
            pairs += [(self.levels[0], b) for b in self.bits]
            pairs = list(dict.fromkeys(pairs))
        out = []
        dims = dict(self.dimensions())
        for level, bits in pairs:
            values = {"sparsity": level, "prune": self.prune_methods[0], "bits": bits, "quant": self.quant_methods[0],
                      "group_size": self.group_sizes[0], "symmetric": self.symmetric[0]}
            params = self.student.params(self.student.largest_cheapest()) if self.student is not None else {}
            for group in self.groups(targets):
                for dim in dims:
                    params[f"{group}:{dim}"] = (pinned or {}).get(group, values)[dim]
            out.append(params)
        return out

    def student_sweep_params(self, targets: Sequence[Target]) -> list[dict[str, Any]]:
        """Optuna params of one dense student per size choice (fewest non-zero distillation steps),
        cheapest first: a first look at every size before the sampler takes over."""
        if self.student is None or not self.baselines:
            return []
        dense = {"sparsity": self.levels[0], "prune": self.prune_methods[0],
                 "bits": DENSE_BITS if DENSE_BITS in self.bits else self.bits[-1], "quant": self.quant_methods[0],
                 "group_size": self.group_sizes[0], "symmetric": self.symmetric[0]}
        group_params = {f"{group}:{dim}": dense[dim] for group in self.groups(targets) for dim in dict(self.dimensions())}
        return [{**self.student.params(values), **group_params} for values in self.student.sweep_values()]

    def describe_uniform(self, params: Mapping[str, Any], pinned: Sequence[str] = ()) -> str | None:
        """'uniform <level> / <bits>b' when every (unpinned) group holds the same values, else None."""
        per_group: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            if is_student_param(key):
                continue
            group, dim = key.rsplit(":", 1)
            if group in pinned:
                continue
            per_group.setdefault(group, {})[dim] = value
        distinct = {tuple(sorted(v.items(), key=lambda kv: kv[0])) for v in per_group.values()}
        if len(distinct) > 1 or (not distinct and self.dimensions()):
            return None
        values = dict(next(iter(distinct))) if distinct else {}  # no dimension to choose: one configuration
        lp = self.layer_plan(values)
        parts = []
        if lp.pruner:
            parts.append(f"{lp.pruner} {lp.pattern if lp.nm else f'{lp.sparsity:g}'}")
        if lp.quantizer:
            parts.append(f"{lp.quantizer} {lp.bits}b")
        return "uniform " + (" + ".join(parts) if parts else "dense")
