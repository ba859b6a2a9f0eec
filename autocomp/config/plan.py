"""Compression plans: what to do to each target layer, as versioned, JSON-serialisable data.

A :class:`LayerPlan` says how one layer is compressed::

    {"method": "wanda+rtn", "sparsity": 0.5, "pattern": "unstructured",
     "bits": 4, "group_size": 128, "symmetric": false}

``method`` is ``"none"``, one registered compressor name, or a pruner and a quantizer joined by
``+`` (pruner first). A pruner is needed exactly when the layer is sparse, a quantizer exactly when
``bits < 16``. ``pattern`` is ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive input
weights; its sparsity is ``1 - N/M``). ``group_size`` is the number of consecutive input weights that
share one scale, or ``-1`` for one scale per output channel.

A :class:`CompressionPlan` maps layer names to layer plans::

    {"version": 1,
     "default": {"method": "rtn", "bits": 4, "group_size": 128},
     "layers": {"re:.*down_proj$": {"method": "rtn", "bits": 8},
                "model.layers.0.self_attn.q_proj": {"method": "none"}},
     "embeddings": false,
     "calibration": {"data": "wikitext2", "split": "validation", "windows": 16, "seq_len": 512, "seed": 0}}

Precedence, resolved per target layer: start from ``default`` (or dense when absent); then every
entry of ``layers`` whose key matches the layer name is applied in file order, each replacing the
whole layer plan (fields it omits take the :class:`LayerPlan` defaults, not the default entry's), so
the **last matching entry wins**. A key is an exact module name, or ``re:`` followed by a Python
regular expression searched in the name (``re.search``: anchor it with ``^``/``$`` as needed).
``default`` and ``re:`` keys apply to the layers inside decoder blocks; the embedding / LM-head
targets are only touched when ``"embeddings": true`` or when a key names them exactly. A key that
matches no target is an error (it is almost always a typo).

An optional ``"student"`` entry (a :class:`~autocomp.students.spec.StudentSpec`) first builds a smaller
model from the original (structured pruning of depth, FFN width and heads, then knowledge
distillation); the layer keys then name the **student's** modules, and the per-layer plans compress
the student (hybrid compression)::

    "student": {"layers": 12, "ffn": 1536, "heads": 3, "distill": {"steps": 200, "temperature": 2.0}}
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from autocomp.errors import PlanError
from autocomp.students.spec import StudentSpec

PLAN_VERSION = 1
ALLOWED_BITS = (2, 3, 4, 5, 6, 8, 16)
DENSE_BITS = 16
PER_CHANNEL = -1
CALIBRATION_MODES = ("dense", "sequential")
_NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``"unstructured"`` -> ``None``; anything else raises PlanError."""
    if pattern == "unstructured":
        return None
    match = _NM_RE.match(str(pattern))
    if not match:
        raise PlanError(f"pattern {pattern!r} is not 'unstructured' or 'N:M' (for example '2:4')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise PlanError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is compressed. Validated on construction; raises PlanError."""

    method: str = "none"
    sparsity: float = 0.0
    pattern: str = "unstructured"
    bits: int = DENSE_BITS
    group_size: int = 128
    symmetric: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise PlanError(f"method must be a non-empty string, got {self.method!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise PlanError(f"bits must be one of {list(ALLOWED_BITS)}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != PER_CHANNEL and self.group_size < 1
        ):
            raise PlanError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise PlanError(f"symmetric must be true or false, got {self.symmetric!r}")
        try:
            sparsity = float(self.sparsity)
        except (TypeError, ValueError):
            raise PlanError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}") from None
        nm = parse_nm(self.pattern)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if sparsity not in (0.0,) and abs(sparsity - implied) > 1e-9:
                raise PlanError(
                    f"pattern {self.pattern} implies sparsity {implied:g}, but sparsity {sparsity:g} was given; "
                    "omit sparsity or make them agree"
                )
            sparsity = implied
        if not 0.0 <= sparsity < 1.0:
            raise PlanError(f"sparsity must be in [0, 1), got {sparsity!r}")
        object.__setattr__(self, "sparsity", round(sparsity, 6))
        pruner, quantizer = split_method(self.method)
        if self.sparsity > 0 and pruner is None:
            raise PlanError(
                f"method {self.method!r} does not prune but sparsity is {self.sparsity:g}; "
                f"use a pruner, e.g. 'magnitude' or 'wanda' (or 'wanda+{quantizer or 'rtn'}' with bits < 16)"
            )
        if self.sparsity == 0 and pruner is not None:
            raise PlanError(f"method {self.method!r} prunes but sparsity is 0; give a sparsity or a pattern")
        if self.bits < DENSE_BITS and quantizer is None:
            raise PlanError(
                f"method {self.method!r} does not quantize but bits is {self.bits}; "
                f"use 'rtn' (or '{pruner}+rtn' to prune and quantize)" if pruner else
                f"method {self.method!r} does not quantize but bits is {self.bits}; use 'rtn'"
            )
        if self.bits == DENSE_BITS and quantizer is not None:
            raise PlanError(f"method {self.method!r} quantizes but bits is 16; give bits < 16 or drop the quantizer")
        from autocomp.compressors.registry import canonical_options, get_compressor

        if pruner is not None and quantizer is not None and not get_compressor(quantizer).holds_pruned:
            raise PlanError(f"method {self.method!r}: {quantizer} cannot hold pruned weights; use {quantizer!r} "
                            "alone (sparsity 0)")

        given = dict(self.options) if not isinstance(self.options, Mapping) else self.options
        object.__setattr__(self, "options", canonical_options(self.method, given))

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)

    @property
    def pruner(self) -> str | None:
        return split_method(self.method)[0]

    @property
    def quantizer(self) -> str | None:
        return split_method(self.method)[1]

    @property
    def is_dense(self) -> bool:
        return self.method == "none"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        if self.options:
            out["options"] = dict(self.options)
        return out

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def key(self) -> str:
        """A canonical string for this plan, stable across versions (used in cache keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "layer plan") -> "LayerPlan":
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected an object with keys {_LAYER_KEYS}, got {data!r}")
        unknown = sorted(set(data) - set(_LAYER_KEYS))
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {unknown}; allowed keys are {_LAYER_KEYS}")
        try:
            return cls(**dict(data))
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None


_LAYER_KEYS = [f.name for f in fields(LayerPlan)]


def split_method(method: str) -> tuple[str | None, str | None]:
    """Split ``"wanda+rtn"`` into ``("wanda", "rtn")`` using the compressor registry's kinds."""
    from autocomp.compressors.registry import compressor_kind  # late: keeps plan.py import-light

    if method == "none":
        return None, None
    parts = method.split("+")
    if len(parts) > 2:
        raise PlanError(f"method {method!r}: at most one pruner and one quantizer, joined by '+'")
    kinds = [compressor_kind(p) for p in parts]
    if len(parts) == 1:
        return (parts[0], None) if kinds[0] == "prune" else (None, parts[0])
    if kinds != ["prune", "quant"]:
        raise PlanError(f"method {method!r}: write the pruner first and the quantizer second, e.g. 'wanda+rtn'")
    return parts[0], parts[1]


def compose_method(pruner: str | None, quantizer: str | None) -> str:
    """Inverse of :func:`split_method`."""
    parts = [p for p in (pruner, quantizer) if p]
    return "+".join(parts) if parts else "none"


DENSE = LayerPlan()


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration windows come from; part of a plan's provenance."""

    data: str = "wikitext2"
    split: str = "validation"     # a dataset split, or all / second-half of a local file
    windows: int = 16
    seq_len: int = 512
    seed: int = 0
    bos: str = "every"
    mode: str = "dense"           # dense: statistics of the dense model; sequential: block by block

    def __post_init__(self) -> None:
        if self.mode not in CALIBRATION_MODES:
            raise PlanError(f"calibration mode {self.mode!r} is not one of {', '.join(CALIBRATION_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibrationSpec":
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise PlanError(f"calibration: unknown key(s) {unknown}; allowed keys are {allowed}")
        return cls(**dict(data))


@dataclass(frozen=True)
class CompressionPlan:
    """A default layer plan plus ordered, keyed overrides. See the module docstring for precedence."""

    default: LayerPlan | None = None
    layers: tuple[tuple[str, LayerPlan], ...] = ()
    embeddings: bool = False
    calibration: CalibrationSpec | None = None
    version: int = PLAN_VERSION
    student: "StudentSpec | None" = None

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version {self.version} is not supported; this autocomp reads version {PLAN_VERSION}")
        for key, _ in self.layers:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise PlanError(f"layer key {key!r} is not a valid regular expression: {exc}") from None

    @classmethod
    def explicit(cls, per_layer: Mapping[str, LayerPlan], calibration: CalibrationSpec | None = None,
                 embeddings: bool = False, student: "StudentSpec | None" = None) -> "CompressionPlan":
        """A plan naming every layer exactly (what a search trial stores). Dense layers are omitted.
        With a ``student``, the names are the student's modules."""
        items = tuple((name, lp) for name, lp in per_layer.items() if not lp.is_dense)
        return cls(default=None, layers=items, embeddings=embeddings, calibration=calibration, student=student)

    def _layer_plans(self) -> list[LayerPlan]:
        return [lp for _, lp in self.layers] + ([self.default] if self.default else [])

    def needs_calibration(self) -> bool:
        from autocomp.compressors.registry import compressor_needs_calibration

        return any(compressor_needs_calibration(lp.method) for lp in self._layer_plans())

    def needs_hessian(self) -> bool:
        from autocomp.compressors.registry import compressor_needs_hessian

        return any(compressor_needs_hessian(lp.method) for lp in self._layer_plans())

    def resolve(self, block_targets: Sequence[str], extra_targets: Sequence[str] = ()) -> dict[str, LayerPlan]:
        """Return the layer plan of every target, in target order (dense where nothing applies).

        ``block_targets`` are the compressible layers inside decoder blocks; ``extra_targets`` are the
        embedding / LM-head targets. Raises PlanError for a key that matches no target.
        """
        all_targets = list(block_targets) + list(extra_targets)
        extra = set(extra_targets)
        result: dict[str, LayerPlan] = {}
        for name in all_targets:
            default_applies = self.embeddings or name not in extra
            result[name] = self.default if (self.default is not None and default_applies) else DENSE
        for key, lp in self.layers:
            if key.startswith("re:"):
                pattern = re.compile(key[3:])
                matched = [n for n in all_targets if (self.embeddings or n not in extra) and pattern.search(n)]
            else:
                matched = [key] if key in result else []
            if not matched:
                sample = ", ".join(all_targets[:4]) + (", ..." if len(all_targets) > 4 else "")
                raise PlanError(f"plan key {key!r} matches no compressible layer of this model (layers look like: {sample})")
            for name in matched:
                result[name] = lp
        return result

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        if self.default is not None:
            out["default"] = self.default.to_dict()
        out["layers"] = {key: lp.to_dict() for key, lp in self.layers}
        out["embeddings"] = self.embeddings
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.student is not None:
            out["student"] = self.student.to_dict()
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> "CompressionPlan":
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected a JSON object, got {type(data).__name__}")
        allowed = ["version", "default", "layers", "embeddings", "calibration", "student"]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {unknown}; allowed keys are {allowed}")
        if "version" not in data:
            raise PlanError(f"{where}: missing 'version' (this autocomp writes and reads version {PLAN_VERSION})")
        if isinstance(data["version"], bool) or not isinstance(data["version"], int):
            raise PlanError(f"{where}: 'version' must be an integer (this autocomp reads version {PLAN_VERSION}), "
                            f"got {data['version']!r}")
        layers_raw = data.get("layers", {}) or {}
        if not isinstance(layers_raw, Mapping):
            raise PlanError(f"{where}: 'layers' must be an object mapping layer names or 're:' patterns to layer plans")
        default = data.get("default")
        embeddings = data.get("embeddings", False)
        if not isinstance(embeddings, bool):
            raise PlanError(f"{where}: 'embeddings' must be true or false")
        calib = data.get("calibration")
        student = data.get("student")
        try:
            return cls(
                default=LayerPlan.from_dict(default, f"{where}: default") if default is not None else None,
                layers=tuple((str(k), LayerPlan.from_dict(v, f"{where}: layers[{k!r}]")) for k, v in layers_raw.items()),
                embeddings=embeddings,
                calibration=CalibrationSpec.from_dict(calib) if calib is not None else None,
                version=int(data["version"]),
                student=StudentSpec.from_dict(student, f"{where}: student") if student is not None else None,
            )
        except PlanError as exc:
            msg = str(exc)
            raise PlanError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "CompressionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> "CompressionPlan":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise PlanError(f"cannot read plan file {p}: {exc.strerror or exc}") from None
        return cls.from_json(text, where=str(p))

    def with_calibration(self, calibration: CalibrationSpec | None) -> "CompressionPlan":
        return replace(self, calibration=calibration)


def summarize(per_layer: Mapping[str, LayerPlan], numels: Mapping[str, int]) -> dict[str, float]:
    """Parameter-weighted average bits and sparsity over the given layers."""
    total = sum(numels[n] for n in per_layer) or 1
    bits = sum(per_layer[n].bits * numels[n] for n in per_layer) / total
    sparsity = sum(per_layer[n].sparsity * numels[n] for n in per_layer) / total
    return {"avg_bits": bits, "avg_sparsity": sparsity}

