"""The modules that run each registered kernel, built from a simulated compressed layer.

Each matmul kernel is a :class:`KernelLinear` (``y = x @ W.T + b`` over inputs ``[..., in_features]``)
with a classmethod ``from_compressed(cw, bias, device, compute_dtype)``; the embedding lookup is
:class:`QuantizedEmbedding`. :data:`KERNEL_MODULES` maps every name in
:data:`~autocomp.deploy.kernels.choose.KERNELS` to its module class. The arithmetic of each kernel,
its shape and dtype constraints and where it is exact are in :mod:`autocomp.deploy.kernels.choose`,
whose predicates the constructors here agree with: a layer that
:func:`~autocomp.deploy.kernels.choose.choose_kernel` gives to a kernel builds, and a layer it cannot
run raises :class:`~autocomp.errors.PlanError`.

Also here: :func:`dequantize`, :func:`exact_zero_codes` and :func:`check_codes_reproduce`, the
relations between a :class:`~autocomp.compressors.rtn.QuantizedWeight`'s codes and its float weight
that every kernel relies on.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autocomp.compressors.rtn import QuantizedWeight, dequantize_codes
from autocomp.deploy.kernels.choose import (
    CPU_ACTIVATION_DTYPES,
    HALF_DTYPES,
    INT4_OUT_MULTIPLE,
    INT8_CPU_BF16_IN_MULTIPLE,
    SEMI_24_IN_MULTIPLE,
    SEMI_24_OUT_MULTIPLE,
    dtype_name,
    int4_op_group,
)
from autocomp.errors import PlanError
from autocomp.pipeline.layer import CompressedWeight

DYNAMIC_REDUCE_RANGE = True           # as torch.ao.nn.quantized.dynamic.Linear on x86 / fbgemm
_CHECK_ROWS = 8192                    # rows per chunk when checking codes against the float weight


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
    """4-bit (or fewer) codes through the int4 weight-only ops (the arithmetic:
    :mod:`~autocomp.deploy.kernels.choose`)."""

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
                raise PlanError(f"int4 kernel on cpu takes float32, bfloat16 or float16, not {dtype_name(dtype)}")
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
    """8-bit (or fewer) per-channel codes through ``torch._weight_int8pack_mm`` (the arithmetic:
    :mod:`~autocomp.deploy.kernels.choose`)."""

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
            raise PlanError(f"int8 kernel on cpu takes float32, bfloat16 or float16, not {dtype_name(dtype)}")
        in_f = quant.codes.shape[1]
        if device.type == "cpu" and dtype == torch.bfloat16 and in_f % INT8_CPU_BF16_IN_MULTIPLE:
            raise PlanError(f"int8 kernel on cpu in bfloat16 needs in_features divisible by "
                            f"{INT8_CPU_BF16_IN_MULTIPLE}, got {in_f}")
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



KERNEL_MODULES: dict[str, type[nn.Module]] = {cls.kernel: cls for cls in (
    Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear, SemiStructured24Linear, QuantizedEmbedding,
    DenseLinear,
)}
"""The module class of each registered kernel, by its :data:`~autocomp.deploy.kernels.choose.KERNELS` name."""
