"""Real kernels for compressed layers: which layer can run one, the modules that do, and a whole model.

Compression in autocomp is simulated in float: a compressed layer holds its dequantized weight
``(codes - zero) * scale``. A deployment runs the packed codes through a kernel instead.
:func:`choose_kernel` says, for one layer plan and shape on a device, which registered kernel
(:data:`KERNELS`) runs the layer exactly as simulated, or why none does; :func:`materialize` swaps
kernel modules into a model in place and leaves every other compressed layer as the simulated float
layer, reporting per layer what it did (:class:`MaterializeReport`).

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
    scale per row, any shape. CPU: ``x`` 2-D, scales in ``x``'s dtype (float32, bfloat16 or float16;
    exact in float32). CUDA: a plain float32 kernel, any activation dtype. Needs one group per row.
    Our codes ``q`` in ``[0, 255]`` with zero ``z`` are stored as ``w = q - c`` (``c = z`` when the row
    fits int8 that way, else 128) with a correction ``y += (c - z) * s * x.sum(-1)``: exact up to
    float rounding. Codes of 2..7 bits fit exactly too (``pack_low_bits``).

``int8_dynamic`` (opt-in, approximate, CPU)
    ``torch.ops.quantized.linear_dynamic`` (the ``torch.ao.nn.quantized.dynamic.Linear`` op) on the
    x86/fbgemm engine with per-channel int8 weights: our asymmetric codes are kept exactly (per-channel
    zero point ``z - 128``; an engine that refuses zero points gets a symmetric requantization, which the
    report says). Activations are quantized to uint8 per tensor at run time with ``reduce_range``
    (7 bits, as PyTorch's module does): on random weights and inputs the output is off by about 1.7 %
    of its norm relative to the exact layer (0.9 % without ``reduce_range``).

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
    The float weight: what a layer without a kernel runs as (the model's own module, unchanged).

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

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autocomp.pipeline.layer import CompressedWeight
from autocomp.compressors.rtn import QuantizedWeight, dequantize_codes, resolve_group_size
from autocomp.errors import PlanError
from autocomp.config.plan import DENSE, DENSE_BITS, LayerPlan
from autocomp.inputs.targets import Target, write_weight

INT4_OP_GROUPS = (256, 128, 64, 32)   # group sizes the int4 ops take, largest first
INT4_OUT_MULTIPLE = 16                # CPU packing needs out % 16 (CUDA: 8; ROCm: 16)
SEMI_24_OUT_MULTIPLE = 32             # CUTLASS fp16/bf16 minimum rows (cuSPARSELt: 16)
SEMI_24_IN_MULTIPLE = 64              # CUTLASS fp16/bf16 minimum columns (cuSPARSELt: 16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DYNAMIC_REDUCE_RANGE = True           # as torch.ao.nn.quantized.dynamic.Linear on x86 / fbgemm
_CHECK_ROWS = 8192                    # rows per chunk when checking codes against the float weight


# ------------------------------------------------------------------------------------ choosing
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
    """A registered kernel: where it runs, which layers it is for, and the module that runs it.

    ``family(plan, request)``: the layer's format is this kernel's business (picks the reason shown
    when it cannot run it). ``check(plan, out_f, in_f, request)``: None when it can run the layer,
    else the reason. ``notes(plan, request)``: ``(exact, note)`` for a layer it runs."""

    name: str
    devices: tuple[str, ...]
    kinds: tuple[str, ...]
    opt_in: bool
    family: Callable[[LayerPlan, KernelRequest], bool]
    check: Callable[[LayerPlan, int, int, KernelRequest], str | None]
    notes: Callable[[LayerPlan, KernelRequest], tuple[bool, str]]
    module: type
    description: str


def _dtype_name(dtype: torch.dtype) -> str:
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


def _quantized(plan: LayerPlan) -> bool:
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


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _device_reason(name: str, devices: Sequence[str], device: str) -> str | None:
    return None if device in devices else f"{name} kernel runs on {' or '.join(devices)}, not {device}"


# int4 weight-only
def _int4_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return _quantized(plan) and (plan.bits == 4 or (req.pack_low_bits and plan.bits < 4))


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
                f"not {_dtype_name(req.compute('int4_weight_only'))}")
    return None


def _compute_note(kernel: str, req: KernelRequest, rounded: str) -> tuple[bool, str]:
    compute = req.compute(kernel)
    if compute == torch.float32 or (kernel == "int8_weight_only" and req.device == "cuda"):
        return True, ""
    note = f"computes in {_dtype_name(compute)} ({rounded} rounded to it)"
    if req.device == "cpu" and req.kernel_dtype is None:
        note += "; kernel_dtype=torch.float32 is exact but 10-60x slower on cpu"
    return False, note


def _int4_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    exact, dtype_note = _compute_note("int4_weight_only", req, "scales and zeros")
    low = f"{plan.bits}-bit codes held as 4-bit" if plan.bits < 4 else ""
    return exact, _join(low, _sparsity_note(plan, req.device, "pruned weights are zero codes"), dtype_note)


# int8 weight-only and dynamic
def _int8_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return _quantized(plan) and (plan.bits == 8 or (req.pack_low_bits and plan.bits < 8))


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
                f"not {_dtype_name(req.compute('int8_weight_only'))}")
    return None


def _int8_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    exact, dtype_note = _compute_note("int8_weight_only", req, "scales")
    low = f"{plan.bits}-bit codes held as 8-bit" if plan.bits < 8 else ""
    return exact, _join(low, _sparsity_note(plan, req.device, "pruned weights are zero codes"), dtype_note)


def _dynamic_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return req.dynamic_int8 and _int8_family(plan, req)


def _dynamic_check(plan: LayerPlan, out_f: int, in_f: int, req: KernelRequest) -> str | None:
    return _device_reason("int8 dynamic", ("cpu",), req.device) or _group_reason("int8 dynamic", plan, in_f)


def _dynamic_notes(plan: LayerPlan, req: KernelRequest) -> tuple[bool, str]:
    low = f"{plan.bits}-bit codes held as 8-bit" if plan.bits < 8 else ""
    return False, _join("approximate: activations quantized to 8 bits per tensor at run time", low,
                        _sparsity_note(plan, req.device, "pruned weights are zero codes"))


# 2:4 semi-structured sparsity
def _semi_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return not _quantized(plan) and plan.nm == (2, 4)


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
    return False, f"{_dtype_name(req.dtype)} model: the 2:4 kernel computes this layer in {_dtype_name(compute)}"


# embedding lookup
def _gather_family(plan: LayerPlan, req: KernelRequest) -> bool:
    return _quantized(plan)


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


# ------------------------------------------------------------------------------------ modules
def _zero_points(quant: QuantizedWeight) -> torch.Tensor:
    """Zero point of every group as float32 ``[out, n_groups]`` (symmetric: ``2^(bits-1)``)."""
    if quant.zeros is not None:
        return quant.zeros.to(torch.float32)
    return torch.full(tuple(quant.scales.shape), float(2 ** (quant.bits - 1)), device=quant.scales.device)


def _expand_groups(per_group: torch.Tensor, group_size: int, in_f: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=-1)[..., :in_f]


def exact_zero_codes(quant: QuantizedWeight, mask: torch.Tensor | None) -> torch.Tensor:
    """The codes with every pruned position set to its group's zero point (so it dequantizes to 0)."""
    codes = quant.codes
    if mask is None:
        return codes
    in_f = codes.shape[1]
    zeros = _expand_groups(_zero_points(quant), quant.group_size, in_f).to(torch.uint8)
    return torch.where(mask, codes, zeros)


def dequantize(quant: QuantizedWeight, mask: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """``(codes - zero) * scale`` per group as float32 (``rows`` of it), pruned positions 0."""
    zeros = None if quant.zeros is None else quant.zeros[rows]
    return dequantize_codes(quant.codes[rows], quant.scales[rows], zeros, quant.bits, quant.group_size,
                            None if mask is None else mask[rows])


def check_codes_reproduce(cw: CompressedWeight, name: str = "layer") -> None:
    """Raise ValueError unless the codes, scales and zeros of ``cw`` dequantize to ``cw.weight``
    (up to the rounding of ``cw.weight``'s dtype): kernels run the codes, the simulation ran the weight."""
    quant = cw.quant
    if quant is None:
        return
    out_f = quant.codes.shape[0]
    eps = torch.finfo(cw.weight.dtype).eps if cw.weight.dtype.is_floating_point else 0.0
    for r0 in range(0, out_f, _CHECK_ROWS):
        rows = slice(r0, min(out_f, r0 + _CHECK_ROWS))
        deq = dequantize(quant, cw.mask, rows)
        w = cw.weight[rows].to(torch.float32)
        bad = (deq - w).abs() > eps * deq.abs() + 1e-30
        if bool(bad.any()):
            diff = float((deq - w).abs().max())
            raise ValueError(f"{name}: codes and scales do not reproduce the compressed float weight "
                             f"(max difference {diff:g}); the compressor's QuantizedWeight is inconsistent")


def _tensor_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _as_bias(bias: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A copy of ``bias`` on ``device``, in its own (the model's) dtype: it is added after the kernel."""
    return None if bias is None else bias.detach().to(device=device).clone()


class KernelLinear(nn.Module):
    """Base of the matmul kernel modules: ``y = x @ W.T + b`` over inputs ``[..., in_features]``."""

    kernel = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)   # added in the input's dtype after the kernel
        self.note = ""   # set when the module had to deviate from its kernel's usual exactness

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors this module keeps resident (weights, scales, zeros, bias)."""
        return [t for t in list(self.buffers(recurse=False)) + list(self.parameters(recurse=False)) if t is not None]

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.resident_tensors())

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W.T`` (no bias) for a 2-D input, in the kernel's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class DenseLinear(KernelLinear):
    """The float weight (the ``dense`` fallback, as a module: baselines and tests)."""

    kernel = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight)

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None, device: torch.device | str,
                        dtype: torch.dtype) -> "DenseLinear":
        device = torch.device(device)
        return cls(cw.weight.detach().to(device=device, dtype=dtype).contiguous(), _as_bias(bias, device))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2.to(self.weight.dtype), self.weight)


class Int4WeightOnlyLinear(KernelLinear):
    """4-bit (or fewer) codes through the int4 weight-only ops (see the module docstring)."""

    kernel = "int4_weight_only"

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, op_group: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)
        self.op_group = op_group
        self.compute_dtype = compute_dtype

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None, device: torch.device | str,
                        dtype: torch.dtype) -> "Int4WeightOnlyLinear":
        device = torch.device(device)
        quant = cw.quant
        if quant is None or quant.bits > 4:
            raise PlanError(f"int4 kernel needs codes of 4 bits or fewer, got {quant.bits if quant else 'none'}")
        out_f, in_f = quant.codes.shape
        g = int4_op_group(quant.group_size, in_f)
        if g is None or out_f % INT4_OUT_MULTIPLE:
            raise PlanError(f"int4 kernel cannot run a {out_f}x{in_f} layer with group size {quant.group_size}")
        codes = exact_zero_codes(quant, cw.mask).cpu()
        per = quant.group_size // g
        scale = quant.scales.cpu().to(torch.float32).repeat_interleave(per, dim=1)[:, : in_f // g]
        zero = _zero_points(quant).cpu().repeat_interleave(per, dim=1)[:, : in_f // g]
        float_zero = (8.0 - zero) * scale                       # (q - 8) * s + (8 - z) * s == (q - z) * s
        scale_zeros = torch.stack([scale, float_zero], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        if device.type == "cuda":
            compute = torch.bfloat16
            c = codes.to(device)
            nibbles = ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()   # even column in the high nibble
            inner = next(t for t in (8, 4, 2) if in_f % (16 * t) == 0)
            packed = torch._convert_weight_to_int4pack(nibbles, inner)
        elif device.type == "cpu":
            if dtype not in CPU_ACTIVATION_DTYPES:
                raise PlanError(f"int4 kernel on cpu takes float32, bfloat16 or float16, not {_dtype_name(dtype)}")
            compute = dtype
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        else:
            raise PlanError(f"int4 kernel runs on cpu or cuda, not {device.type}")
        return cls(packed, scale_zeros.to(device=device, dtype=compute), g, in_f, out_f,
                   _as_bias(bias, device), compute)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(self.compute_dtype).contiguous()
        if self.packed.device.type == "cuda":
            y = torch._weight_int4pack_mm(x2, self.packed, self.op_group, self.scale_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.op_group, self.scale_zeros)
        return y


def _int8_rows(codes: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row offset ``c`` (the zero point when ``q - z`` fits int8, else 128) and ``q - c`` as int8."""
    q = codes.to(torch.int16)
    z = zero.to(torch.int16)
    fits = ((q.amax(dim=1) - z) <= 127) & ((q.amin(dim=1) - z) >= -128)
    offset = torch.where(fits, z, torch.full_like(z, 128))
    return offset, (q - offset[:, None]).to(torch.int8).contiguous()


class Int8WeightOnlyLinear(KernelLinear):
    """8-bit (or fewer) per-channel codes through ``torch._weight_int8pack_mm`` (see the module docstring)."""

    kernel = "int8_weight_only"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, correction: torch.Tensor | None,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("correction", correction)   # float32 (c - z) * s per row; None when all zero
        self.compute_dtype = compute_dtype

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None, device: torch.device | str,
                        dtype: torch.dtype) -> "Int8WeightOnlyLinear":
        device = torch.device(device)
        quant = cw.quant
        if quant is None or quant.bits > 8 or quant.scales.shape[1] != 1:
            raise PlanError("int8 weight-only kernel needs codes of 8 bits or fewer with one group per row")
        if device.type not in ("cpu", "cuda"):
            raise PlanError(f"int8 weight-only kernel runs on cpu or cuda, not {device.type}")
        if device.type == "cpu" and dtype not in CPU_ACTIVATION_DTYPES:
            raise PlanError(f"int8 kernel on cpu takes float32, bfloat16 or float16, not {_dtype_name(dtype)}")
        codes = exact_zero_codes(quant, cw.mask).cpu()
        zero = _zero_points(quant).cpu()[:, 0]
        scale = quant.scales.cpu().to(torch.float32)[:, 0]
        offset, w8 = _int8_rows(codes, zero)
        corr = (offset.to(torch.float32) - zero) * scale
        scale_dtype = dtype if device.type == "cpu" else torch.float32   # the CPU op wants x's dtype
        correction = corr.to(device=device) if bool((corr != 0).any()) else None
        return cls(w8.to(device), scale.to(device=device, dtype=scale_dtype), correction,
                   _as_bias(bias, device), dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(self.compute_dtype).contiguous()
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        if self.correction is not None:   # in float32: it can be large next to the result
            y = y.to(torch.float32) + x2.to(torch.float32).sum(dim=-1, keepdim=True) * self.correction
        return y


class Int8DynamicLinear(KernelLinear):
    """Per-channel int8 weights with activations quantized at run time (x86 / fbgemm; approximate)."""

    kernel = "int8_dynamic"

    def __init__(self, packed_params: Any, weight_bytes: int, in_features: int, out_features: int,
                 requantized: bool) -> None:
        super().__init__(in_features, out_features)
        self.packed_params = packed_params
        self.weight_bytes = weight_bytes
        self.requantized = requantized
        if requantized:
            self.note = ("weights requantized symmetric per channel (the quantized engine takes no zero points): "
                         "not the simulated codes")

    @property
    def nbytes(self) -> int:
        return self.weight_bytes

    @property
    def opaque_bytes(self) -> int:
        """Bytes held by the engine's packed weight, outside any torch parameter or buffer."""
        return self.weight_bytes

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None, device: torch.device | str,
                        dtype: torch.dtype) -> "Int8DynamicLinear":
        if torch.device(device).type != "cpu":
            raise PlanError("int8 dynamic kernel runs on cpu only")
        quant = cw.quant
        if quant is None or quant.bits > 8 or quant.scales.shape[1] != 1:
            raise PlanError("int8 dynamic kernel needs codes of 8 bits or fewer with one group per row")
        codes = exact_zero_codes(quant, cw.mask).cpu()
        zero = _zero_points(quant).cpu()[:, 0].to(torch.int64)
        scale = quant.scales.cpu().to(torch.float64)[:, 0]
        out_f, in_f = codes.shape
        b = None if bias is None else bias.detach().cpu().to(torch.float32).contiguous()
        requantized = False
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13, the ops still run
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated")
            qweight = torch._make_per_channel_quantized_tensor(
                (codes.to(torch.int16) - 128).to(torch.int8), scale, zero - 128, 0)
            try:
                packed = torch.ops.quantized.linear_prepack(qweight, b)
            except RuntimeError:  # e.g. onednn: symmetric weights only
                w = cw.weight.detach().cpu().to(torch.float32)
                s = (w.abs().amax(dim=1) / 127.0).clamp(min=2.0 ** -24).to(torch.float64)
                q = torch.clamp(torch.round(w / s[:, None].to(torch.float32)), -127, 127).to(torch.int8)
                qweight = torch._make_per_channel_quantized_tensor(q, s, torch.zeros(out_f, dtype=torch.int64), 0)
                packed = torch.ops.quantized.linear_prepack(qweight, b)
                requantized = True
        weight_bytes = out_f * in_f + out_f * 16 + (0 if b is None else b.numel() * 4)  # int8 + scale/zero per row
        return cls(packed, weight_bytes, in_f, out_f, requantized)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x2.to(torch.float32).contiguous(), self.packed_params,
                                                  DYNAMIC_REDUCE_RANGE)


class SemiStructured24Linear(KernelLinear):
    """A 2:4-pruned float weight as a semi-structured sparse tensor (CUDA, sm80+, fp16/bf16)."""

    kernel = "semi_structured_2_4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.compute_dtype = compute_dtype

    def resident_tensors(self) -> list[torch.Tensor]:
        w = self.weight.data if isinstance(self.weight, nn.Parameter) else self.weight
        inner = [getattr(w, a, None) for a in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
        return [t for t in inner if isinstance(t, torch.Tensor)] + ([self.bias] if self.bias is not None else [])

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, bias: torch.Tensor | None, device: torch.device | str,
                        dtype: torch.dtype) -> "SemiStructured24Linear":
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise PlanError(f"2:4 sparse kernel needs a CUDA device, got {device}"
                            + ("" if torch.cuda.is_available() else " (torch.cuda.is_available() is False)"))
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise PlanError(f"2:4 sparse kernel needs a GPU of compute capability 8.0 or newer, this one is {major}.{minor}")
        out_f, in_f = cw.weight.shape
        if out_f % SEMI_24_OUT_MULTIPLE or in_f % SEMI_24_IN_MULTIPLE:
            raise PlanError(f"2:4 sparse kernel cannot run a {out_f}x{in_f} layer")
        compute = dtype if dtype in HALF_DTYPES else torch.bfloat16
        w = cw.weight.detach().to(device=device, dtype=compute).contiguous()
        kept = (w.reshape(-1, 4) != 0).sum(dim=1)
        if bool((kept > 2).any()):
            raise PlanError("2:4 sparse kernel: the weight has more than 2 nonzeros in some group of 4 inputs")
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        backend = (SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available()
                   else SparseSemiStructuredTensorCUTLASS)
        return cls(backend.from_dense(w), _as_bias(bias, device), compute)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2.to(self.compute_dtype).contiguous(), self.weight)


class QuantizedEmbedding(nn.Module):
    """An embedding lookup over stored codes: only the gathered rows are dequantized (exact).

    ``codes``: uint8 ``[vocab, ceil(dim/2)]`` nibbles (even column in the low nibble) when ``nibbles``,
    else ``[vocab, dim]`` uint8 codes or int8 values (an int8 kernel's weight, shared with the tied LM
    head). A row dequantizes to ``(code - zero) * scale`` per group, times ``embed_scale`` when the
    original embedding scales its output (Gemma)."""

    kernel = "embedding_gather"

    def __init__(self, codes: torch.Tensor, nibbles: bool, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, embedding_dim: int, dtype: torch.dtype,
                 embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)     # fp16 [vocab, groups]
        self.register_buffer("zeros", zeros)       # int16 [vocab, groups]
        self.register_buffer("embed_scale", embed_scale, persistent=False)
        self.nibbles = nibbles
        self.group_size = group_size
        self.num_embeddings = codes.shape[0]
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    @classmethod
    def from_compressed(cls, cw: CompressedWeight, device: torch.device | str, dtype: torch.dtype,
                        embed_scale: torch.Tensor | None = None,
                        shared: Int8WeightOnlyLinear | None = None) -> "QuantizedEmbedding":
        """Build from ``cw``; with ``shared`` (the tied head's int8 kernel) its int8 weight is reused."""
        device = torch.device(device)
        quant = cw.quant
        if quant is None:
            raise PlanError("a quantized embedding needs codes")
        vocab, dim = quant.codes.shape
        zero = _zero_points(quant).cpu().to(torch.int16)
        scales = quant.scales.detach().cpu().to(torch.float16).to(device)
        es = None if embed_scale is None else embed_scale.detach().to(device)
        if shared is not None:
            offset, _ = _int8_rows(exact_zero_codes(quant, cw.mask).cpu(), zero[:, 0].to(torch.float32))
            zeros = (zero - offset[:, None]).to(device)
            return cls(shared.weight_int8, False, scales, zeros, quant.group_size, dim, dtype, es)
        codes = exact_zero_codes(quant, cw.mask).cpu()
        nibbles = quant.bits <= 4
        if nibbles:
            if dim % 2:
                codes = F.pad(codes, (0, 1))
            codes = codes[:, ::2] | (codes[:, 1::2] << 4)
        return cls(codes.contiguous().to(device), nibbles, scales, zero.to(device), quant.group_size, dim, dtype, es)

    def resident_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.zeros) if t is not None]

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.resident_tensors())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[input_ids]
        if self.nibbles:
            rows = torch.stack([rows & 15, rows >> 4], dim=-1).flatten(-2)[..., : self.embedding_dim]
        q = rows.to(torch.float32)
        scale = self.scales[input_ids].to(torch.float32)
        zero = self.zeros[input_ids].to(torch.float32)
        if scale.shape[-1] > 1:
            scale = _expand_groups(scale, self.group_size, self.embedding_dim)
            zero = _expand_groups(zero, self.group_size, self.embedding_dim)
        out = ((q - zero) * scale).to(self.dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kernel={self.kernel}, nibbles={self.nibbles}"


KERNELS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    KernelSpec("int4_weight_only", ("cpu", "cuda"), ("linear",), False, _int4_family, _int4_check, _int4_notes,
               Int4WeightOnlyLinear, "4-bit group-wise weights, float activations (tinygemm / CPU int4pack)"),
    KernelSpec("int8_dynamic", ("cpu",), ("linear",), True, _dynamic_family, _dynamic_check, _dynamic_notes,
               Int8DynamicLinear, "per-channel int8 weights, activations quantized at run time (fbgemm / x86)"),
    KernelSpec("int8_weight_only", ("cpu", "cuda"), ("linear",), False, _int8_family, _int8_check, _int8_notes,
               Int8WeightOnlyLinear, "per-channel int8 weights, float activations (_weight_int8pack_mm)"),
    KernelSpec("semi_structured_2_4", ("cuda",), ("linear",), False, _semi_family, _semi_check, _semi_notes,
               SemiStructured24Linear, "2:4 sparse fp16/bf16 weights (cuSPARSELt / CUTLASS)"),
    KernelSpec("embedding_gather", ("cpu", "cuda"), ("embedding",), False, _gather_family, _gather_check,
               _gather_notes, QuantizedEmbedding, "embedding lookup over stored codes"),
    KernelSpec("dense", ("cpu", "cuda"), ("linear", "embedding"), False, _never, _always_ok, _exact_no_note,
               DenseLinear, "the float weight (layers without a kernel)"),
)}
"""Registered kernels in order of preference (``dense`` is the fallback, never chosen by a predicate)."""


def format_label(plan: LayerPlan, in_features: int) -> str:
    """A short label of a layer's stored format: ``"int4 g128 asym"``, ``"3-bit g128 asym"``,
    ``"2:4 sparse"``, ``"50% sparse + int8 per-channel sym"``, ``"dense"``."""
    if plan.is_dense:
        return "dense"
    parts = []
    if plan.sparsity > 0:
        parts.append(f"{plan.pattern} sparse" if plan.nm is not None else f"{round(plan.sparsity * 100):g}% sparse")
    if _quantized(plan):
        name = f"int{plan.bits}" if plan.bits in (4, 8) else f"{plan.bits}-bit"
        group = "per-channel" if _per_channel(plan, in_features) else f"g{plan.group_size}"
        parts.append(f"{name} {group} {'sym' if plan.symmetric else 'asym'}")
    return " + ".join(parts) or "dense"


def _no_family_reason(plan: LayerPlan, req: KernelRequest) -> str:
    if _quantized(plan):
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
        runs = "runs dequantized in float" if _quantized(plan) else "runs as a dense float layer"
        reason = f"{main}: {runs} (no speed-up)"
    else:
        reason = _no_family_reason(plan, req)
    if not pack_low_bits and _quantized(plan) and plan.bits not in (4, 8):
        packed = choose_kernel(plan, out_f, in_f, dev, dynamic_int8, kind=kind, dtype=dtype, pack_low_bits=True,
                               kernel_dtype=kernel_dtype)
        if packed.kernel is not None:
            container = "4-bit" if packed.kernel == "int4_weight_only" else "8-bit"
            reason += f"; pack_low_bits=True runs it with {packed.kernel} ({container} storage)"
    return KernelChoice(fmt, None, True, reason, dev)


# ------------------------------------------------------------------------------------ a model
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
    report = MaterializeReport(str(dev), _dtype_name(dtype))
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
        if _quantized(plan) and cw.quant is None:
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
        spec = KERNELS[choice.kernel]
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
            new_head = spec.module.from_compressed(cw, getattr(head, "bias", None), dev, compute)
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
            choice = replace(choice, reason=_join(choice.reason, new_head.note, note))
            _record(report, t, choice, new_modules, seen)
            continue
        new = spec.module.from_compressed(cw, getattr(module, "bias", None), dev, compute)
        _set_module(model, t.name, new)
        if new.note:
            choice = replace(choice, exact=False, reason=_join(choice.reason, new.note))
        _record(report, t, choice, [new], seen)
    return report


def _record(report: MaterializeReport, t: Target, choice: KernelChoice, modules: Sequence[nn.Module],
            seen: set[int]) -> None:
    tensors = [x for m in modules for x in _module_tensors(m)]
    names = " + ".join(dict.fromkeys(type(m).__name__ for m in modules))
    report.layers[t.name] = LayerKernel(t.name, choice, names, _new_bytes(tensors, seen), t.numel)
