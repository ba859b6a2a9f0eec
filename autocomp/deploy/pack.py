"""Packing one simulated compressed layer into the tensors a deployment format stores, and back.

Compression is simulated in float (:class:`~autocomp.pipeline.layer.CompressedWeight`); this
module stores exactly what :func:`autocomp.evaluators.size.layer_size` accounts for, so the bytes of
a packed layer equal its accounted bytes up to rounding each tensor to whole bytes.

A ``[out, in]`` layer is stored as some of these tensors (names are the keys of the dict returned by
:func:`pack_layer`; ``kept`` is the number of stored weight values, in row-major order):

========== ========================= =================================================================
key        dtype, length             content
========== ========================= =================================================================
dense      storage dtype, [out, in]  the whole weight (dense layers only)
values     storage dtype, [kept]     the kept weights (sparse, not quantized)
codes      uint8, packed             the kept weights' integer codes, ``bits`` each
scales     float16, [out, groups]    one scale per group of ``group_size`` consecutive inputs
zeros      uint8, packed             one zero point per group, ``bits`` each (asymmetric only)
mask       uint8, packed             unstructured keep-mask, 1 bit per weight (row-major)
nm_index   uint8, packed             N:M: each stored weight's index inside its group of M inputs,
                                     ``ceil(log2 M)`` bits each; N per group, ascending
========== ========================= =================================================================

"packed" is a little-endian bit stream (:func:`pack_bits`): value ``i`` occupies bits
``[i * b, (i + 1) * b)``, where bit ``k`` is bit ``k % 8`` of byte ``k // 8``; the stream is
``ceil(count * b / 8)`` bytes long. A symmetric quantizer's zero point is ``2^(bits-1)`` and is not
stored. Pruned weights are not stored: their code is the zero point and their value is zero.

An N:M group that keeps fewer than N weights (a mask that is not full N:M) is padded with pruned
positions, stored with value zero (code = zero point), so the weight still reconstructs exactly; the
unpacked mask then marks those positions as kept. A group keeping more than N is refused.

Unpacking dequantizes with the same element-wise float32 arithmetic as the simulation
(``(code - zero) * scale``, then the mask, then a cast), so a packed quantized layer comes back
bit-identical; non-quantized values come back as they were rounded to the storage dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from autocomp.pipeline.layer import CompressedWeight
from autocomp.compressors.rtn import QuantizedWeight, dequantize_codes, resolve_group_size
from autocomp.errors import AutocompError, PlanError
from autocomp.config.plan import DENSE_BITS, LayerPlan, parse_nm

STORAGE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                          "float32": torch.float32}
_CHUNK_VALUES = 1 << 24   # values packed per vectorised step (bounds the int64 temporaries to ~128 MB)


class PackedFormatError(AutocompError):
    """A packed model file or layer is missing, corrupt, or of a format version this autocomp cannot read."""


# ---------------------------------------------------------------------------------------------
# bit streams
# ---------------------------------------------------------------------------------------------

def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of a stream of ``count`` values of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _pack_chunk(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v``: 1-D, length a multiple of 8, values < 2^bits -> ``len(v) * bits / 8`` bytes."""
    if 8 % bits == 0:  # whole values per byte: stay in uint8
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        return (v.to(torch.uint8).reshape(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    # 8 values make exactly `bits` bytes: gather them into one 8*bits-bit word, then split it
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (v.to(torch.int64).reshape(-1, 8) << shifts).sum(dim=1)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_chunk(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_chunk`: ``len(b)`` a multiple of ``bits`` -> ``len(b) * 8 / bits`` values."""
    low = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, dtype=torch.uint8) * bits
        return ((b.unsqueeze(1) >> shifts) & low).reshape(-1)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (b.to(torch.int64).reshape(-1, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    return ((word.unsqueeze(1) >> shifts) & low).to(torch.uint8).reshape(-1)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2^bits`` (any integer or bool dtype, flattened) into a
    little-endian bit stream of exactly ``ceil(n * bits / 8)`` uint8 bytes. Raises ValueError for an
    out-of-range value or ``bits`` outside 1..8. Vectorised, in chunks of 16M values."""
    _check_bits(bits)
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"pack_bits takes integer or bool values, got {values.dtype}")
    flat = values.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits, got [{lo}, {hi}]")
    if bits == 8:
        return flat.to(torch.uint8, copy=True).contiguous()
    out = torch.empty(packed_nbytes(-(-n // 8) * 8, bits), dtype=torch.uint8)
    for start in range(0, n, _CHUNK_VALUES):
        chunk = flat[start:start + _CHUNK_VALUES]
        if chunk.numel() % 8:
            chunk = torch.nn.functional.pad(chunk.to(torch.int64), (0, 8 - chunk.numel() % 8))
        first = start * bits // 8
        out[first:first + chunk.numel() * bits // 8] = _pack_chunk(chunk, bits)
    return out[:packed_nbytes(n, bits)].clone() if out.numel() != packed_nbytes(n, bits) else out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` values (uint8, 1-D) of a stream written by :func:`pack_bits`. Raises ValueError when
    ``packed`` is not a 1-D uint8 tensor of exactly ``ceil(n * bits / 8)`` bytes."""
    _check_bits(bits)
    expected = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"a stream of {n} values at {bits} bits is {expected} uint8 bytes (1-D), "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    if bits == 8:
        return packed.clone()
    groups = -(-n // 8)
    padded = packed
    if packed.numel() < groups * bits:
        padded = torch.nn.functional.pad(packed, (0, groups * bits - packed.numel()))
    out = torch.empty(groups * 8, dtype=torch.uint8)
    chunk_bytes = _CHUNK_VALUES * bits // 8
    for start in range(0, padded.numel(), chunk_bytes):
        first = start * 8 // bits
        values = _unpack_chunk(padded[start:start + chunk_bytes], bits)
        out[first:first + values.numel()] = values
    return out[:n]


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    for name, d in STORAGE_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype}")


@dataclass(frozen=True)
class LayerFormat:
    """How one ``[out_features, in_features]`` layer is stored (JSON-serialisable, see module docstring).

    ``bits`` is 16 when the layer is not quantized (values then stored in ``storage_dtype``);
    ``group_size`` is resolved (never -1) when quantized and 0 otherwise; ``sparse`` is ``"none"``,
    ``"unstructured"`` or ``"N:M"``.
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int
    symmetric: bool
    sparse: str
    storage_dtype: str

    def __post_init__(self) -> None:
        bad = []
        for name in ("out_features", "in_features", "bits", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad.append(f"{name}={value!r}")
        if not bad:
            if self.out_features < 1 or self.in_features < 1:
                bad.append(f"shape {self.out_features}x{self.in_features}")
            if self.quantized != (self.group_size > 0) or not (self.quantized or self.bits == DENSE_BITS):
                bad.append(f"bits={self.bits} with group_size={self.group_size}")
            if self.quantized and not 1 <= self.bits <= 8:
                bad.append(f"bits={self.bits}")
        if not isinstance(self.symmetric, bool):
            bad.append(f"symmetric={self.symmetric!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            bad.append(f"storage_dtype={self.storage_dtype!r}")
        if self.sparse not in ("none", "unstructured"):
            try:
                parse_nm(self.sparse)
            except PlanError:
                bad.append(f"sparse={self.sparse!r}")
        if bad:
            raise PackedFormatError(f"malformed packed layer format ({', '.join(bad)}); the file is corrupt or "
                                    "was written by another program: export the model again")

    @property
    def quantized(self) -> bool:
        return self.bits < DENSE_BITS

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.sparse in ("none", "unstructured") else parse_nm(self.sparse)

    @property
    def is_dense(self) -> bool:
        return not self.quantized and self.sparse == "none"

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size) if self.quantized else 0

    @property
    def index_bits(self) -> int:
        nm = self.nm
        return math.ceil(math.log2(nm[1])) if nm is not None else 0

    @classmethod
    def from_plan(cls, plan: LayerPlan, out_features: int, in_features: int,
                  storage_dtype: torch.dtype = torch.bfloat16) -> "LayerFormat":
        quantized = plan.quantizer is not None
        return cls(out_features, in_features,
                   bits=plan.bits if quantized else DENSE_BITS,
                   group_size=resolve_group_size(plan.group_size, in_features) if quantized else 0,
                   symmetric=plan.symmetric if quantized else False,
                   sparse="none" if plan.pruner is None else plan.pattern,
                   storage_dtype=dtype_name(storage_dtype))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerFormat":
        names = list(cls.__dataclass_fields__)
        if not isinstance(data, Mapping) or set(data) != set(names):
            raise PackedFormatError(f"malformed packed layer format {data!r}: expected the keys {names}; "
                                    "the file is corrupt or was written by another program: export the model again")
        return cls(**dict(data))


def _zero_points(quant: QuantizedWeight, in_features: int) -> torch.Tensor:
    """Zero point of every weight, uint8 ``[out, in]``."""
    if quant.zeros is None:
        return torch.full(quant.codes.shape, 1 << (quant.bits - 1), dtype=torch.uint8)
    return quant.zeros[:, torch.arange(in_features) // quant.group_size]


def signed_codes(cw: CompressedWeight) -> torch.Tensor:
    """``code - zero`` of every weight of a quantized layer (int16 ``[out, in]``), 0 where pruned: the
    integers that times the group scale give the simulated weight (what engines' formats store)."""
    q = cw.quant
    signed = q.codes.to(torch.int16) - _zero_points(q, q.codes.shape[1]).to(torch.int16)
    if cw.mask is not None:
        signed = torch.where(cw.mask, signed, torch.zeros((), dtype=signed.dtype))
    return signed


def _check_matches(cw: CompressedWeight, fmt: LayerFormat) -> None:
    """The simulated layer holds what its plan says; raises PlanError otherwise."""
    shape = (fmt.out_features, fmt.in_features)
    problems = []
    if fmt.quantized != (cw.quant is not None):
        problems.append("quantized" if cw.quant is not None else "not quantized")
    elif cw.quant is not None:
        q = cw.quant
        if (q.bits, q.group_size, q.zeros is None) != (fmt.bits, fmt.group_size, fmt.symmetric):
            problems.append(f"quantized at {q.bits} bits, group size {q.group_size}, "
                            f"{'symmetric' if q.zeros is None else 'asymmetric'}")
        if tuple(q.codes.shape) != shape or tuple(q.scales.shape) != (fmt.out_features, fmt.n_groups) or (
                q.zeros is not None and tuple(q.zeros.shape) != (fmt.out_features, fmt.n_groups)):
            problems.append("codes / scales / zero points of the wrong shape")
    if (fmt.sparse != "none") != (cw.mask is not None):
        problems.append("pruned" if cw.mask is not None else "without a keep-mask")
    elif cw.mask is not None and (cw.mask.dtype != torch.bool or tuple(cw.mask.shape) != shape):
        problems.append(f"a keep-mask of {cw.mask.dtype} {tuple(cw.mask.shape)}")
    if problems:
        raise PlanError(f"the compressed weight does not match its layer plan (bits {fmt.bits}, group size "
                        f"{fmt.group_size}, symmetric {fmt.symmetric}, sparsity {fmt.sparse}): it is "
                        f"{'; '.join(problems)}; pack the weight with the plan it was compressed with")


def _nm_positions(mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored positions (bool ``[out, in]``, exactly ``n`` per group of ``m``) and their in-group indices
    (row-major order). Groups keeping fewer than ``n`` are padded with their first pruned positions."""
    out_f, in_f = mask.shape
    if in_f % m:
        raise PlanError(f"an {n}:{m} layer needs the input size to be a multiple of {m}, this one has {in_f}")
    blocks = mask.reshape(out_f, in_f // m, m)
    count = blocks.sum(dim=2)
    if int(count.max()) > n:
        raise PlanError(f"the keep-mask is not {n}:{m}: a group of {m} consecutive inputs keeps {int(count.max())} "
                        f"weights; pack it with an unstructured plan or prune it {n}:{m}")
    stored = blocks
    if int(count.min()) < n:  # pad short groups with their first pruned positions
        free = ~blocks
        stored = blocks | (free & (free.cumsum(dim=2) <= (n - count).unsqueeze(2)))
    index = torch.arange(m, dtype=torch.uint8).expand(out_f, in_f // m, m)[stored]
    return stored.reshape(out_f, in_f), index


def pack_layer(cw: CompressedWeight, plan: LayerPlan, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors storing ``cw`` (compressed under ``plan``) with float values in ``dtype`` (see the
    module docstring). Raises PlanError when ``cw`` does not hold what ``plan`` says (wrong bits or
    group size, a mask that is not N:M, ...)."""
    out_f, in_f = cw.weight.shape
    fmt = LayerFormat.from_plan(plan, out_f, in_f, dtype)
    _check_matches(cw, fmt)
    if fmt.is_dense:
        return {"dense": cw.weight.detach().to(dtype, copy=True).contiguous()}
    tensors: dict[str, torch.Tensor] = {}
    stored: torch.Tensor | None = None       # bool [out, in]: positions whose value is stored
    if fmt.nm is not None:
        stored, index = _nm_positions(cw.mask, *fmt.nm)
        tensors["nm_index"] = pack_bits(index, fmt.index_bits)
    elif cw.mask is not None:
        stored = cw.mask
        tensors["mask"] = pack_bits(cw.mask.reshape(-1), 1)
    if cw.quant is not None:
        q = cw.quant
        codes = q.codes if cw.mask is None else torch.where(cw.mask, q.codes, _zero_points(q, in_f))
        tensors["codes"] = pack_bits(codes[stored] if stored is not None else codes, fmt.bits)
        tensors["scales"] = q.scales.to(torch.float16, copy=True).contiguous()
        if q.zeros is not None:
            tensors["zeros"] = pack_bits(q.zeros, fmt.bits)
    else:
        values = torch.where(cw.mask, cw.weight.detach(), torch.zeros((), dtype=cw.weight.dtype))
        tensors["values"] = values[stored].to(dtype).contiguous()
    return tensors


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes the tensors' data take (what a layer adds to a safetensors file, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _corrupt(what: str) -> PackedFormatError:
    return PackedFormatError(f"packed layer is corrupt: {what}; export the model again")


def _stream(tensors: Mapping[str, torch.Tensor], key: str, count: int, bits: int) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise _corrupt(f"tensor {key!r} is missing")
    try:
        return unpack_bits(t, bits, count)
    except ValueError as exc:
        raise _corrupt(f"tensor {key!r}: {exc}") from None


def _floats(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise _corrupt(f"tensor {key!r} is missing")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise _corrupt(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    return t


def unpack_layer(tensors: Mapping[str, torch.Tensor], fmt: LayerFormat,
                 dtype: torch.dtype = torch.float32) -> CompressedWeight:
    """Rebuild the simulated layer from :func:`pack_layer`'s tensors: the weight in ``dtype``, the
    keep-mask, and the codes / fp16 scales / zero points (``quant.weight`` in float32). Raises
    PackedFormatError when a tensor is missing or of the wrong size or dtype."""
    out_f, in_f = fmt.out_features, fmt.in_features
    storage = STORAGE_DTYPES[fmt.storage_dtype]
    if fmt.is_dense:
        return CompressedWeight(_floats(tensors, "dense", (out_f, in_f), storage).to(dtype, copy=True), None, None)
    mask: torch.Tensor | None = None
    if fmt.nm is not None:
        n, m = fmt.nm
        if in_f % m:
            raise _corrupt(f"an {n}:{m} layer with {in_f} inputs")
        kept = out_f * (in_f // m) * n
        index = _stream(tensors, "nm_index", kept, fmt.index_bits).to(torch.int64)
        if kept and int(index.max()) >= m:
            raise _corrupt(f"an N:M index of {int(index.max())} in groups of {m}")
        mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool)
        mask.scatter_(2, index.reshape(out_f, in_f // m, n), True)
        mask = mask.reshape(out_f, in_f)
        if int(mask.sum()) != kept:
            raise _corrupt(f"N:M indices repeat inside a group of {m}")
    elif fmt.sparse == "unstructured":
        mask = _stream(tensors, "mask", out_f * in_f, 1).reshape(out_f, in_f).bool()
    kept = int(mask.sum()) if mask is not None else out_f * in_f
    if not fmt.quantized:
        values = _floats(tensors, "values", (kept,), storage)
        weight = torch.zeros(out_f, in_f, dtype=dtype).masked_scatter_(mask, values.to(dtype))
        return CompressedWeight(weight, mask, None)
    gs, groups = fmt.group_size, fmt.n_groups
    scales = _floats(tensors, "scales", (out_f, groups), torch.float16)
    zeros = None if fmt.symmetric else _stream(tensors, "zeros", out_f * groups, fmt.bits).reshape(out_f, groups)
    col_group = torch.arange(in_f) // gs
    if zeros is None:
        codes = torch.full((out_f, in_f), 1 << (fmt.bits - 1), dtype=torch.uint8)
    else:
        codes = zeros[:, col_group].contiguous()
    kept_codes = _stream(tensors, "codes", kept, fmt.bits)
    if mask is None:
        codes = kept_codes.reshape(out_f, in_f)
    else:
        codes.masked_scatter_(mask, kept_codes)
    deq = dequantize_codes(codes, scales, zeros, fmt.bits, gs, mask)   # the simulation's own arithmetic
    quant = QuantizedWeight(deq.contiguous(), codes, scales.clone(), zeros, fmt.bits, gs)
    return CompressedWeight(deq.to(dtype).contiguous(), mask, quant)
