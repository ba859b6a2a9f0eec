"""A whole model on real kernels: :func:`materialize` and its :class:`MaterializeReport`.

:func:`materialize` swaps kernel modules (:mod:`autocomp.deploy.kernels.modules`) into a model in
place wherever :func:`~autocomp.deploy.kernels.choose.choose_kernel` finds a kernel for a target's
plan on the device, leaves every other compressed target as the simulated float layer, and reports
per layer what it did and the resident bytes it holds (:class:`LayerKernel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from autocomp.config.plan import DENSE, LayerPlan
from autocomp.deploy.kernels.choose import (
    KernelChoice,
    choose_kernel,
    compute_dtype,
    dtype_name,
    format_label,
    is_quantized,
    join_notes,
)
from autocomp.deploy.kernels.modules import (
    KERNEL_MODULES,
    Int8WeightOnlyLinear,
    QuantizedEmbedding,
    check_codes_reproduce,
)
from autocomp.errors import PlanError
from autocomp.inputs.targets import Target, write_weight
from autocomp.pipeline.layer import CompressedWeight


@dataclass(frozen=True)
class LayerKernel:
    """What :func:`materialize` did to one target."""

    name: str
    choice: KernelChoice
    module: str            # class name of the module(s) now there
    nbytes: int            # resident bytes first counted at this layer (shared storage counted once)
    numel: int


@dataclass
class MaterializeReport:
    """Per-layer kernel choices of a materialised model, and totals."""

    device: str
    dtype: str
    layers: dict[str, LayerKernel] = field(default_factory=dict)

    @property
    def choices(self) -> dict[str, KernelChoice]:
        return {name: layer.choice for name, layer in self.layers.items()}

    @property
    def kernel_layers(self) -> list[str]:
        """Compressed layers running a kernel."""
        return [n for n, lk in self.layers.items() if lk.choice.kernel is not None]

    @property
    def no_kernel(self) -> dict[str, str]:
        """Compressed layers running as float layers, with the reason."""
        return {n: lk.choice.reason for n, lk in self.layers.items()
                if lk.choice.format != "dense" and lk.choice.kernel is None}

    @property
    def dense_layers(self) -> list[str]:
        return [n for n, lk in self.layers.items() if lk.choice.format == "dense"]

    @property
    def inexact(self) -> dict[str, str]:
        """Layers whose kernel does not reproduce the simulated weight exactly, with the reason."""
        return {n: lk.choice.reason for n, lk in self.layers.items() if not lk.choice.exact}

    @property
    def resident_bytes(self) -> int:
        """Resident bytes of all target layers' weights (shared storage counted once)."""
        return sum(lk.nbytes for lk in self.layers.values())

    def reasons(self) -> dict[str, int]:
        """How many compressed layers run without a kernel, by reason."""
        out: dict[str, int] = {}
        for reason in self.no_kernel.values():
            out[reason] = out.get(reason, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "dtype": self.dtype, "resident_bytes": self.resident_bytes,
            "kernel_layers": len(self.kernel_layers), "no_kernel_layers": len(self.no_kernel),
            "dense_layers": len(self.dense_layers), "no_kernel_reasons": self.reasons(),
            "layers": {n: {"format": lk.choice.format, "kernel": lk.choice.kernel, "exact": lk.choice.exact,
                           "reason": lk.choice.reason, "module": lk.module, "nbytes": lk.nbytes}
                       for n, lk in self.layers.items()},
        }

    def table(self) -> str:
        """One line per layer: name, format, kernel (or ``-``), bytes, reason."""
        width = max((len(n) for n in self.layers), default=4)
        fwidth = max((len(lk.choice.format) for lk in self.layers.values()), default=6)
        lines = [f"{'layer':<{width}}  {'format':<{fwidth}}  {'kernel':<19}  {'bytes':>11}  reason"]
        for n, lk in self.layers.items():
            c = lk.choice
            lines.append(f"{n:<{width}}  {c.format:<{fwidth}}  {c.kernel or '-':<19}  {lk.nbytes:>11}  {c.reason}")
        lines.append(f"{len(self.kernel_layers)} layers with kernels, {len(self.no_kernel)} compressed without, "
                     f"{len(self.dense_layers)} dense; resident weights {self.resident_bytes / 1e6:.2f} MB")
        return "\n".join(lines)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    if hasattr(module, "resident_tensors"):
        return module.resident_tensors()
    return [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            if t is not None and not (isinstance(t, torch.Tensor) and t.dim() == 0)]


def _new_bytes(tensors: Sequence[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _embedding_lookup_ok(module: nn.Module) -> str | None:
    """None when the module is a plain embedding (or Gemma's scaled one), else why it is kept as is."""
    if isinstance(module, nn.Embedding) and (type(module).forward is nn.Embedding.forward
                                             or isinstance(getattr(module, "embed_scale", None), torch.Tensor)):
        return None
    return f"the embedding module {type(module).__name__} has its own forward; kept as a float lookup"


def _embed_scale(module: nn.Module) -> torch.Tensor | None:
    es = getattr(module, "embed_scale", None)
    return es if isinstance(es, torch.Tensor) and type(module).forward is not nn.Embedding.forward else None


def materialize(model: nn.Module, targets: Sequence[Target], compressed: Mapping[str, CompressedWeight],
                plans: Mapping[str, LayerPlan], device: str = "cpu", dtype: torch.dtype = torch.float32,
                dynamic_int8: bool = False, pack_low_bits: bool = False,
                kernel_dtype: torch.dtype | None = None, check_codes: bool = True) -> MaterializeReport:
    """Swap kernel modules into ``model`` in place (pass a copy) and report what runs where.

    A target whose plan (``plans``; missing: dense) has a kernel on ``device`` (:func:`choose_kernel`)
    is replaced by that kernel's module, built on ``device`` from ``compressed[name]``; a tied
    embedding / LM head becomes a quantized lookup plus a head kernel over the same codes. Every other
    compressed target gets the simulated float weight written into its module; dense targets are left
    alone. Move the model to ``device`` / ``dtype`` first: kernel modules compute in
    :func:`compute_dtype` (bfloat16 on CPU unless ``kernel_dtype`` says otherwise: float32 is exact but
    slow) and return the input's dtype. With ``check_codes``, a layer's codes must
    reproduce its float weight (ValueError otherwise). Raises PlanError for a compressed plan without
    a compressed weight, or a kernel that cannot be built here (no CUDA, an old GPU)."""
    dev = torch.device(device)
    report = MaterializeReport(str(dev), dtype_name(dtype))
    seen: set[int] = set()
    for t in targets:
        plan = plans.get(t.name, DENSE)
        module = model.get_submodule(t.name)
        head_name = t.tied_with[0] if t.tied_with else None
        modules = [module] + ([model.get_submodule(head_name)] if head_name else [])
        if plan.is_dense:
            choice = choose_kernel(plan, t.out_features, t.in_features, dev.type)
            _record(report, t, choice, modules, seen)
            continue
        cw = compressed.get(t.name)
        if cw is None:
            raise PlanError(f"{t.name}: the plan compresses it ({format_label(plan, t.in_features)}) "
                            "but no compressed weight was given")
        if is_quantized(plan) and cw.quant is None:
            raise PlanError(f"{t.name}: the plan quantizes it to {plan.bits} bits but its compressed weight has no codes")
        if check_codes:
            check_codes_reproduce(cw, t.name)
        kind = "embedding" if t.kind == "embedding" and not t.tied_with else "linear"
        choice = choose_kernel(plan, t.out_features, t.in_features, dev.type, dynamic_int8, kind=kind,
                               dtype=dtype, pack_low_bits=pack_low_bits, kernel_dtype=kernel_dtype)
        if choice.kernel is None:
            write_weight(module, cw.weight)   # a tied head follows (same parameter)
            _record(report, t, choice, modules, seen)
            continue
        module_class = KERNEL_MODULES[choice.kernel]
        compute = compute_dtype(choice.kernel, dev.type, dtype, kernel_dtype)
        if kind == "embedding":
            blocked = _embedding_lookup_ok(module)
            if blocked:
                write_weight(module, cw.weight)
                _record(report, t, KernelChoice(choice.format, None, True, blocked, dev.type), modules, seen)
                continue
            new = QuantizedEmbedding.from_compressed(cw, dev, dtype, _embed_scale(module))
            _set_module(model, t.name, new)
            _record(report, t, choice, [new], seen)
            continue
        if t.kind == "embedding":   # tied: the head runs the kernel, the lookup reads the same codes
            head = modules[1]
            new_head = module_class.from_compressed(cw, getattr(head, "bias", None), dev, compute)
            blocked = _embedding_lookup_ok(module)
            if blocked or cw.quant is None:
                write_weight(module, cw.weight)
                note = blocked or "the embedding keeps the float weight for lookups"
                new_modules = [module, new_head]
            else:
                shared = new_head if isinstance(new_head, Int8WeightOnlyLinear) else None
                new_emb = QuantizedEmbedding.from_compressed(cw, dev, dtype, _embed_scale(module), shared)
                _set_module(model, t.name, new_emb)
                note = ("tied: the lookup shares the head's int8 weight" if shared is not None
                        else "tied: the lookup keeps its own copy of the codes")
                new_modules = [new_emb, new_head]
            _set_module(model, head_name, new_head)
            choice = replace(choice, reason=join_notes(choice.reason, new_head.note, note))
            _record(report, t, choice, new_modules, seen)
            continue
        new = module_class.from_compressed(cw, getattr(module, "bias", None), dev, compute)
        _set_module(model, t.name, new)
        if new.note:
            choice = replace(choice, exact=False, reason=join_notes(choice.reason, new.note))
        _record(report, t, choice, [new], seen)
    return report


def _record(report: MaterializeReport, t: Target, choice: KernelChoice, modules: Sequence[nn.Module],
            seen: set[int]) -> None:
    tensors = [x for m in modules for x in _module_tensors(m)]
    names = " + ".join(dict.fromkeys(type(m).__name__ for m in modules))
    report.layers[t.name] = LayerKernel(t.name, choice, names, _new_bytes(tensors, seen), t.numel)
