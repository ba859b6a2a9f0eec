"""Which registered kernel runs a compressed layer, or why none does.

Compression in autocomp is simulated in float: a compressed layer holds its dequantized weight
``(codes - zero) * scale``. A deployment runs the packed codes through a kernel instead.
:data:`KERNELS` is the registry (name -> :class:`KernelSpec`, in order of preference);
:func:`choose_kernel` says, for one layer plan and shape on a device, which of them runs the layer
exactly as simulated, or why none does (:class:`KernelChoice`). Everything here is pure: it touches
no device and imports no kernel op; the modules that run each kernel are in
:mod:`autocomp.deploy.kernels.modules` (``KERNEL_MODULES``, keyed by the same names).

What each kernel computes (established by experiment on torch 2.13, CPU with AVX512, and from the
ATen sources for CUDA):

``int4_weight_only``
    ``torch._weight_int4pack_mm_for_cpu(x, packed, g, sz)`` (CPU) and ``torch._weight_int4pack_mm``
    (CUDA) compute ``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * sz[k // g, n, 0] + sz[k // g, n, 1]``:
    the zero is a *float* added after scaling, with codes offset by 8. Our ``(q - z) * s`` is exactly
    that with ``sz = (s, (8 - z) * s)``; every term is a small multiple of the fp16 scale's last bit,
    so in float32 the kernel's weight equals the simulated one bit for bit. Constraints: group size
    ``g`` in 32/64/128/256 with ``in_features % g == 0`` (a larger or per-channel group runs as
    several op groups sharing one scale, so any group that is a multiple of one of those, with
    ``in_features`` divisible by it, is exact, ragged last group included); ``out_features % 16 == 0``;
    activations 2-D, float32, bfloat16 or float16 on CPU (``sz`` in the activation dtype: exact only
    in float32), bfloat16 only on CUDA (so scales are rounded to bfloat16 there: not exact). CPU takes
    int32 codes ``[out, in]`` (innerKTiles is ignored); CUDA takes uint8 ``[out, in/2]`` with the
    even column in the high nibble and innerKTiles in 2/4/8 (``in_features % (16 * innerKTiles) == 0``).
    Codes of fewer bits (2, 3) fit the same format exactly (``pack_low_bits``). Pruned weights are
    zero codes: exact, but the sparsity is not exploited.

``int8_weight_only``
    ``torch._weight_int8pack_mm(x, w, s)`` computes ``(x @ w.T) * s`` for int8 ``w [out, in]`` and one
    scale per row. CPU: ``x`` 2-D, scales in ``x``'s dtype (float32, bfloat16 or float16; exact in
    float32); in bfloat16 ``in_features`` must be a multiple of 16 (other widths crash the process or
    return inf / NaN, torch 2.13 AVX512), any shape otherwise. CUDA: a plain float32 kernel, any
    activation dtype and shape. Needs one group per row.
    Our codes ``q`` in ``[0, 255]`` with zero ``z`` are stored as ``w = q - c`` (``c = z`` when the row
    fits int8 that way, else 128) with a correction ``y += (c - z) * s * x.sum(-1)``: exact up to
    float rounding. Codes of 2..7 bits fit exactly too (``pack_low_bits``).

``int8_dynamic`` (opt-in, approximate, CPU)
    ``torch.ops.quantized.linear_dynamic`` (the ``torch.ao.nn.quantized.dynamic.Linear`` op) on the
    x86/fbgemm engine with per-channel int8 weights: our asymmetric codes are kept exactly (per-channel
    zero point ``z - 128``; an engine that refuses zero points gets a symmetric requantization, which the
    report says). Activations are quantized to uint8 per tensor at run time with ``reduce_range``
    (7 bits, as PyTorch's module does): on random weights and inputs the output is off by about 1.7 %
    of its norm relative to the exact layer (0.9 % without ``reduce_range``); the registry states the
    bound (:attr:`KernelSpec.rel_error`).

``semi_structured_2_4`` (CUDA, sm80+)
    ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS when cuSPARSELt is absent) for
    layers pruned to the 2:4 pattern and not quantized; runs in float16/bfloat16 (a float32 model gets
    this layer in bfloat16). Needs ``out_features % 32 == 0`` and ``in_features % 64 == 0``.

``embedding_gather``
    An embedding lookup over stored codes (int4 nibbles for 4 bits or fewer, else one byte each) and
    scales: only the gathered rows are dequantized. Exact for any bit width and group size. A tied
    embedding / LM head uses it for the lookup and a matmul kernel for the head over the same quantized
    weight (int8: the very same tensor; int4: the head keeps the kernel's own packed copy).

``dense``
    The float weight: what a layer without a kernel runs as (the model's own module, unchanged);
    :data:`FALLBACK_KERNEL`, never chosen by a predicate.

"Exact" means the kernel's effective weight equals the simulated float weight cast to the compute
dtype; outputs then differ from ``F.linear`` only by accumulation order.

Compute dtype (:func:`compute_dtype`): on CPU the int4 and int8 weight-only ops are fast only with
bfloat16 activations; their float32 / float16 paths are 10-60x *slower* than float32 ``F.linear``
(torch 2.13, AVX512, 2 threads: decode 1x640->2048 takes 1.27 ms in float32 vs 0.057 ms in bfloat16,
float32 ``F.linear`` 0.14 ms). So by default they compute in bfloat16 (inputs cast in, outputs cast
back; scales rounded to bfloat16: not exact, about 0.5 % of the logit scale on the tiny test models);
``kernel_dtype=torch.float32`` gives the exact, slow path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from autocomp.compressors.rtn import resolve_group_size
from autocomp.config.plan import DENSE_BITS, LayerPlan

INT4_OP_GROUPS = (256, 128, 64, 32)   # group sizes the int4 ops take, largest first
INT4_OUT_MULTIPLE = 16                # CPU packing needs out % 16 (CUDA: 8; ROCm: 16)
SEMI_24_OUT_MULTIPLE = 32             # CUTLASS fp16/bf16 minimum rows (cuSPARSELt: 16)
SEMI_24_IN_MULTIPLE = 64              # CUTLASS fp16/bf16 minimum columns (cuSPARSELt: 16)
INT8_CPU_BF16_IN_MULTIPLE = 16        # CPU int8 op in bfloat16: other in_features crash or give inf / NaN
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelChoice:
    """How one layer runs. ``kernel`` is a :data:`KERNELS` name, or None when it runs as a float layer.

    ``exact``: the kernel's weight equals the simulated one (in the compute dtype). ``reason``: why no
    kernel runs the layer, or what to know about the one that does (empty when nothing)."""

    format: str
    kernel: str | None
    exact: bool
    reason: str
    device: str = "cpu"


@dataclass(frozen=True)
class KernelRequest:
    """Everything besides the layer's plan and shape that decides its kernel."""

    device: str                        # "cpu" | "cuda" | another torch device type
    dynamic_int8: bool = False
    kind: str = "linear"               # "linear" (a matmul) | "embedding" (a lookup)
    dtype: torch.dtype = torch.float32           # the model's dtype
    pack_low_bits: bool = False                  # run 2..7-bit codes in the int4 / int8 containers
    kernel_dtype: torch.dtype | None = None      # the kernels' compute dtype; None: see compute_dtype

    def compute(self, kernel: str) -> torch.dtype:
        return compute_dtype(kernel, self.device, self.dtype, self.kernel_dtype)


@dataclass(frozen=True)
class KernelSpec:
    """A registered kernel: where it runs and which layers it is for.

    ``family(plan, request)``: the layer's format is this kernel's business (picks the reason shown
    when it cannot run it). ``check(plan, out_f, in_f, request)``: None when it can run the layer,
    else the reason. ``notes(plan, request)``: ``(exact, note)`` for a layer it runs. ``rel_error``:
    for a kernel approximate by design (activations quantized at run time), the bound on its output's
    relative error ``||y - y_sim|| / ||y_sim||`` against the simulated layer, which the kernel contract
    suite checks; 0.0 for a kernel whose weight is exact in its compute dtype. The module that runs
    the kernel is ``KERNEL_MODULES[name]`` in :mod:`autocomp.deploy.kernels.modules`."""

    name: str
    devices: tuple[str, ...]
    kinds: tuple[str, ...]
    opt_in: bool
    family: Callable[[LayerPlan, KernelRequest], bool]
    check: Callable[[LayerPlan, int, int, KernelRequest], str | None]
    notes: Callable[[LayerPlan, KernelRequest], tuple[bool, str]]
    description: str
    rel_error: float = 0.0


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: how reasons and reports name a dtype."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(kernel: str, device: str, dtype: torch.dtype, kernel_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``kernel`` computes in for a model of ``dtype`` (``kernel_dtype``: asked for explicitly).

    On CPU the int4 / int8 weight-only ops are fast only in bfloat16: their float32 and float16 paths
    are 10-60x slower than float ``F.linear`` (measured, torch 2.13, AVX512, 2 threads), so they compute
    in bfloat16 unless ``kernel_dtype`` says otherwise (float32 is exact). The CUDA int4 kernel is
    bfloat16 only; the CUDA int8 kernel computes in float32 whatever its input; int8_dynamic takes
    float32; 2:4 runs in float16 / bfloat16; lookups and dense layers use the model's dtype."""
    if kernel == "int4_weight_only":
        return torch.bfloat16 if device == "cuda" else (kernel_dtype or torch.bfloat16)
    if kernel == "int8_weight_only":
        return kernel_dtype or (torch.bfloat16 if device == "cpu" else dtype)
    if kernel == "int8_dynamic":
        return torch.float32
    if kernel == "semi_structured_2_4":
        wanted = kernel_dtype or dtype
        return wanted if wanted in HALF_DTYPES else torch.bfloat16
    return dtype


def is_quantized(plan: LayerPlan) -> bool:
    """The plan stores codes (fewer bits than a float weight)."""
    return plan.bits < DENSE_BITS


def _per_channel(plan: LayerPlan, in_f: int) -> bool:
    return resolve_group_size(plan.group_size, in_f) == in_f


def int4_op_group(group_size: int, in_features: int) -> int | None:
    """The int4 op group size that represents groups of ``group_size`` exactly, or None.

    The largest of 256/128/64/32 dividing both the (resolved) group size and ``in_features``: each
    of our groups is then a whole number of op groups that share its scale and zero."""
    gs = resolve_group_size(group_size, in_features)
    for g in INT4_OP_GROUPS:
        if gs % g == 0 and in_features % g == 0:
            return g
    return None


def _sparsity_note(plan: LayerPlan, device: str, how: str) -> str:
    if plan.sparsity <= 0:
        return ""
    return f"sparsity not exploited on {device} ({how})"


def join_notes(*parts: str) -> str:
    """The non-empty ``parts`` joined by ``"; "`` (how reasons and notes are combined)."""
    return "; ".join(p for p in parts if p)


def _device_reason(name: str, devices: Sequence[str], device: str) -> str | None:
    return None if device in devices else f"{name} kernel runs on {' or '.join(devices)}, not {device}"


# int4 weight-only
def _int4_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return is_quantized(plan) and (plan.bits == 4 or (req.pack_low_bits and plan.bits < 4))


def _int4_check(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    reason = _device_reason("int4", ("cpu", "cuda"), req.device)
    if reason:
        return reason
    if int4_op_group(plan.group_size, in_f) is None:
        return (f"int4 kernel needs groups of 32, 64, 128 or 256 weights (or a multiple of one that divides "
                f"in_features); this layer has group_size {plan.group_size} and in_features {in_f}")
    if out_f % INT4_OUT_MULTIPLE:
        return f"int4 kernel needs out_features divisible by {INT4_OUT_MULTIPLE}; this layer has {out_f}"
    if req.device == "cpu" and req.compute("int4_weight_only") not in CPU_ACTIVATION_DTYPES:
        return (f"int4 kernel on cpu takes float32, bfloat16 or float16 activations, "
                f"not {dtype_name(req.compute('int4_weight_only'))}")
    return None


def _compute_note(kernel: str, req: KernelRequest, rounded: str) -> tuple[bool, str]:
    compute = req.compute(kernel)
    if compute == torch.float32 or (kernel == "int8_weight_only" and req.device == "cuda"):
        return True, ""
    note = f"computes in {dtype_name(compute)} ({rounded} rounded to it)"
    if req.device == "cpu" and req.kernel_dtype is None:
        note += "; kernel_dtype=torch.float32 is exact but 10-60x slower on cpu"
    return False, note


def _int4_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    exact, dtype_note = _compute_note("int4_weight_only", req, "scales and zeros")
    low = f"{plan.bits}-bit codes held as 4-bit" if plan.bits < 4 else ""
    return exact, join_notes(low, _sparsity_note(plan, req.device, "pruned weights are zero codes"), dtype_note)


# int8 weight-only and dynamic
def _int8_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return is_quantized(plan) and (plan.bits == 8 or (req.pack_low_bits and plan.bits < 8))


def _group_reason(kernel: str, plan: LayerPlan, in_f: int) -> str | None:
    if _per_channel(plan, in_f):
        return None
    return (f"{kernel} kernel needs one group per row (group_size -1); "
            f"this layer has group_size {plan.group_size}")


def _int8_check(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    reason = _device_reason("int8 weight-only", ("cpu", "cuda"), req.device) or _group_reason(
        "int8 weight-only", plan, in_f)
    if reason:
        return reason
    if req.device == "cpu" and req.compute("int8_weight_only") not in CPU_ACTIVATION_DTYPES:
        return (f"int8 kernel on cpu takes float32, bfloat16 or float16 activations, "
                f"not {dtype_name(req.compute('int8_weight_only'))}")
    if req.device == "cpu" and req.compute("int8_weight_only") == torch.bfloat16 and in_f % INT8_CPU_BF16_IN_MULTIPLE:
        return (f"int8 kernel on cpu in bfloat16 needs in_features divisible by {INT8_CPU_BF16_IN_MULTIPLE}; "
                f"this layer has {in_f} (kernel_dtype=torch.float32 or torch.float16 takes it)")
    return None


def _int8_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    exact, dtype_note = _compute_note("int8_weight_only", req, "scales")
    low = f"{plan.bits}-bit codes held as 8-bit" if plan.bits < 8 else ""
    return exact, join_notes(low, _sparsity_note(plan, req.device, "pruned weights are zero codes"), dtype_note)


def _dynamic_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return req.dynamic_int8 and _int8_family(plan, req)


def _dynamic_check(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    return _device_reason("int8 dynamic", ("cpu",), req.device) or _group_reason("int8 dynamic", plan, in_f)


def _dynamic_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    low = f"{plan.bits}-bit codes held as 8-bit" if plan.bits < 8 else ""
    return False, join_notes("approximate: activations quantized to 8 bits per tensor at run time", low,
                        _sparsity_note(plan, req.device, "pruned weights are zero codes"))


# 2:4 semi-structured sparsity
def _semi_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return not is_quantized(plan) and plan.nm == (2, 4)


def _semi_check(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    if req.device != "cuda":
        return "2:4 sparse kernels need CUDA"
    if out_f % SEMI_24_OUT_MULTIPLE or in_f % SEMI_24_IN_MULTIPLE:
        return (f"2:4 sparse kernel needs out_features % {SEMI_24_OUT_MULTIPLE} == 0 and in_features % "
                f"{SEMI_24_IN_MULTIPLE} == 0; this layer is {out_f}x{in_f}")
    return None


def _semi_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    compute = req.compute("semi_structured_2_4")
    if compute == req.dtype:
        return True, ""
    return False, f"{dtype_name(req.dtype)} model: the 2:4 kernel computes this layer in {dtype_name(compute)}"


# embedding lookup
def _gather_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return is_quantized(plan)


def _gather_check(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    return None


def _gather_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    return True, _sparsity_note(plan, req.device, "pruned weights are zero codes")


def _never(plan: LayerPlan, req: KernelRequest) -> bool:
    return False


def _always_ok(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    return None


def _exact_no_note(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    return True, ""


FALLBACK_KERNEL = "dense"
"""The kernel a layer without one runs as: its float weight, never chosen by a predicate."""

KERNELS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    KernelSpec("int4_weight_only", ("cpu", "cuda"), ("linear",), False, _int4_family, _int4_check, _int4_notes,
               "4-bit group-wise weights, float activations (tinygemm / CPU int4pack)"),
    KernelSpec("int8_dynamic", ("cpu",), ("linear",), True, _dynamic_family, _dynamic_check, _dynamic_notes,
               "per-channel int8 weights, activations quantized at run time (fbgemm / x86)", rel_error=0.04),
    KernelSpec("int8_weight_only", ("cpu", "cuda"), ("linear",), False, _int8_family, _int8_check, _int8_notes,
               "per-channel int8 weights, float activations (_weight_int8pack_mm)"),
    KernelSpec("semi_structured_2_4", ("cuda",), ("linear",), False, _semi_family, _semi_check, _semi_notes,
               "2:4 sparse fp16/bf16 weights (cuSPARSELt / CUTLASS)"),
    KernelSpec("embedding_gather", ("cpu", "cuda"), ("embedding",), False, _gather_family, _gather_check,
               _gather_notes, "embedding lookup over stored codes"),
    KernelSpec(FALLBACK_KERNEL, ("cpu", "cuda"), ("linear", "embedding"), False, _never, _always_ok,
               _exact_no_note, "the float weight (layers without a kernel)"),
)}
"""Registered kernels in order of preference (the first whose family and check accept a layer runs
it; :data:`FALLBACK_KERNEL` stays last)."""


def format_label(plan: LayerPlan, in_features: int) -> str:
    """A short label of a layer's stored format: ``"int4 g128 asym"``, ``"3-bit g128 asym"``,
    ``"2:4 sparse"``, ``"50% sparse + int8 per-channel sym"``, ``"dense"``."""
    if plan.is_dense:
        return "dense"
    parts = []
    if plan.sparsity > 0:
        parts.append(f"{plan.pattern} sparse" if plan.nm is not None else f"{round(plan.sparsity * 100):g}% sparse")
    if is_quantized(plan):
        name = f"int{plan.bits}" if plan.bits in (4, 8) else f"{plan.bits}-bit"
        group = "per-channel" if _per_channel(plan, in_features) else f"g{plan.group_size}"
        parts.append(f"{name} {group} {'sym' if plan.symmetric else 'asym'}")
    return " + ".join(parts) or "dense"


def _no_family_reason(plan: LayerPlan, req: KernelRequest) -> str:
    if is_quantized(plan):
        return f"no {plan.bits}-bit kernel on {req.device}: runs dequantized in float (no speed-up)"
    what = "unstructured" if plan.nm is None else plan.pattern
    where = "" if plan.nm != (2, 4) else f" on {req.device}"
    return f"no kernel for {what} sparsity{where}: runs as a dense float layer with zeros (no speed-up)"


def choose_kernel(plan: LayerPlan, out_f: int, in_f: int, device: str, dynamic_int8: bool = False, *,
                  kind: str = "linear", dtype: torch.dtype = torch.float32, pack_low_bits: bool = False,
                  kernel_dtype: torch.dtype | None = None) -> KernelChoice:
    """The kernel that runs a layer of ``plan`` and shape ``[out_f, in_f]`` on ``device``, or why none does.

    ``kind`` is ``"linear"`` for a matmul (a tied embedding's LM head included) or ``"embedding"`` for
    an untied embedding's lookup. ``dtype`` (the model's) and ``kernel_dtype`` (the kernels' compute
    dtype, None: :func:`compute_dtype`'s default, bfloat16 on CPU) only decide ``exact`` and the note.
    ``dynamic_int8`` allows the approximate ``int8_dynamic`` kernel; ``pack_low_bits`` runs 2/3-bit codes
    in the int4 kernel and 5..7-bit per-channel codes in the int8 ones (exact, no extra saving). Pure:
    touches no device."""
    dev = torch.device(device).type
    fmt = format_label(plan, in_f)
    if plan.is_dense:
        return KernelChoice("dense", None, True, "dense layer (not compressed)", dev)
    req = KernelRequest(dev, dynamic_int8, kind, dtype, pack_low_bits, kernel_dtype)
    failed: list[tuple[bool, str]] = []   # (opt-in kernel, reason)
    for spec in KERNELS.values():
        if kind not in spec.kinds or (spec.opt_in and not dynamic_int8) or not spec.family(plan, req):
            continue
        reason = spec.check(plan, out_f, in_f, req)
        if reason is None:
            exact, note = spec.notes(plan, req)
            return KernelChoice(fmt, spec.name, exact, note, dev)
        failed.append((spec.opt_in, reason))
    if failed:
        main = min(failed, key=lambda f: f[0])[1]   # a standard kernel's reason first
        runs = "runs dequantized in float" if is_quantized(plan) else "runs as a dense float layer"
        reason = f"{main}: {runs} (no speed-up)"
    else:
        reason = _no_family_reason(plan, req)
    if not pack_low_bits and is_quantized(plan) and plan.bits not in (4, 8):
        packed = choose_kernel(plan, out_f, in_f, dev, dynamic_int8, kind=kind, dtype=dtype, pack_low_bits=True,
                               kernel_dtype=kernel_dtype)
        if packed.kernel is not None:
            container = "4-bit" if packed.kernel == "int4_weight_only" else "8-bit"
            reason += f"; pack_low_bits=True runs it with {packed.kernel} ({container} storage)"
    return KernelChoice(fmt, None, True, reason, dev)

