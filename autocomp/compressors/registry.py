"""Registry of compressors by short, stable name (``rtn``, ``magnitude``, ``wanda``, ...).

A compressor is registered with an explicit decorator, never found by walking packages::

    @register_compressor("magnitude", kind="prune", prune_group="tensor")
    def magnitude_mask(weight, sparsity, nm, stats): ...

Two kinds exist. A *pruner* returns a boolean keep-mask of the weight's shape (``[out, in]``);
a *quantizer* returns a :class:`QuantizedWeight` (dequantized float weight plus its scales and zero
points). A *joint* pruner (SparseGPT) reconstructs the kept weights and quantizes them in the same
pass: it takes the whole layer plan, ``fn(weight, plan, stats) -> CompressedWeight``.

A method with parameters of its own (GPTQ's ``act_order``, ``damp``) registers an options dataclass;
a layer plan's ``options`` are checked against it (unknown keys name the allowed ones) and stored
with every default filled in, so equal plans have equal keys. This module imports nothing heavy so
that plans can be validated without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Mapping

from autocomp.errors import PlanError

Kind = Literal["prune", "quant"]


@dataclass(frozen=True)
class CompressorEntry:
    name: str
    kind: Kind
    fn: Callable
    needs_calibration: bool
    prune_group: str  # pruners: "tensor" (rank over the layer) or "row" (per output row); "" for quantizers
    options: type | None = None   # dataclass of the method's own parameters
    joint: bool = False           # a pruner that also quantizes in the same pass
    needs_hessian: bool = False   # needs the input Hessian (X X^T), not only per-feature norms
    data_free_fallback: str = "rtn"   # quantizers: what a layer without input statistics takes instead
    holds_pruned: bool = True     # quantizers: can follow a pruner (keeps pruned weights exactly zero)

    @property
    def data_free(self) -> bool:
        """True when the result depends on the weight alone (so stitching variants is exact)."""
        return not self.needs_calibration


_REGISTRY: dict[str, CompressorEntry] = {}


def register_compressor(name: str, kind: Kind, needs_calibration: bool = False,
                        prune_group: str = "", options: type | None = None,
                        joint: bool = False, needs_hessian: bool = False, data_free_fallback: str = "rtn",
                        holds_pruned: bool = True) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name``. Raises ValueError on a duplicate name (a programming error).

    A pruner declares its unstructured comparison group (``"tensor"`` or ``"row"``) so that the
    number of pruned weights, and hence the size, is known without running it.
    """
    if kind not in ("prune", "quant"):
        raise ValueError(f"kind must be 'prune' or 'quant', got {kind!r}")
    if (kind == "prune") != (prune_group in ("tensor", "row")):
        raise ValueError("a pruner needs prune_group 'tensor' or 'row'; a quantizer none")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"compressor {name!r} is registered twice")
        _REGISTRY[name] = CompressorEntry(name, kind, fn, needs_calibration or needs_hessian, prune_group, options, joint,
                                          needs_hessian, data_free_fallback, holds_pruned)
        return fn

    return decorate


def get_compressor(name: str) -> CompressorEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PlanError(f"unknown compression method {name!r}; known methods: {', '.join(available_compressors())}") from None


def available_compressors(kind: Kind | None = None) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def compressor_kind(name: str) -> Kind:
    return get_compressor(name).kind


def compressor_needs_hessian(method: str) -> bool:
    """True if any part of a (possibly ``a+b``) method needs input Hessians."""
    if method == "none":
        return False
    return any(get_compressor(part).needs_hessian for part in method.split("+"))


def compressor_needs_calibration(method: str) -> bool:
    """True if any part of a (possibly ``a+b``) method needs calibration statistics."""
    if method == "none":
        return False
    return any(get_compressor(part).needs_calibration for part in method.split("+"))


def canonical_options(method: str, given: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Validate ``given`` against the options of every part of ``method``; return them with defaults
    filled in, as sorted ``(key, value)`` pairs. Raises PlanError naming unknown keys or bad values."""
    given = dict(given or {})
    if method == "none":
        if given:
            raise PlanError(f"method 'none' takes no options, got {sorted(given)}")
        return ()
    merged: dict[str, Any] = {}
    allowed: list[str] = []
    for part in method.split("+"):
        cls = get_compressor(part).options
        if cls is None:
            continue
        names = [f.name for f in fields(cls)]
        allowed.extend(names)
        try:
            merged.update(asdict(cls(**{k: v for k, v in given.items() if k in names})))
        except TypeError as exc:
            raise PlanError(f"options of {part!r}: {exc}") from None
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise PlanError(f"method {method!r} has no option(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
    return tuple(sorted(merged.items()))
