"""llama.cpp's own tensor types as quantizers: ``ggml`` (data-free) and ``ggml-imatrix``.

A layer planned as ``{"method": "ggml-imatrix", "bits": 4}`` is quantized by ggml's quantizer
(``ggml_quantize_chunk``, the function ``llama-quantize`` runs on every tensor) into llama.cpp's
K-quant of that width, and de-quantized by ggml's own ``to_float``: the trial scores exactly the
weights llama.cpp will compute with, and the GGUF export writes the very blocks ggml produced.

==========  ==========  =================================================================
bits        type        rows that are not a multiple of 256 (llama.cpp's own fallback)
==========  ==========  =================================================================
2           Q2_K        Q4_0
3           Q3_K        Q4_0
4           Q4_K        Q5_0
5           Q5_K        Q5_1
6           Q6_K        Q8_0
8           Q8_0        (32-blocks)
==========  ==========  =================================================================

A row length that is not a multiple of 32 holds none of them (PlanError). ``group_size`` and
``symmetric`` do not apply: the type fixes its blocks. ``ggml-imatrix`` hands ggml the layer's
importance matrix, the per-column mean of the squared calibration inputs (what ``llama-imatrix``
records); a layer without input statistics (an embedding) takes ``ggml``. Pruned weights cannot be
held (K-quant blocks with a minimum do not keep zeros), so neither method follows a pruner.

The ggml library is the one llama-cpp-python ships (the ``llamacpp`` extra); ctypes releases the
GIL in its calls, so rows are quantized on every core at once.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from autocomp._imports import LLAMA_CPP_INSTALL, optional
from autocomp.compressors.registry import register_compressor
from autocomp.errors import PlanError

K_QUANT = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
# llama.cpp's fallback for rows that are not a multiple of 256 (tensor_type_fallback in llama-quant.cpp)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
GGML_METHODS = ("ggml", "ggml-imatrix")
# llama-quantize's presets whose types these methods express (K-quants and Q8_0): a space's baselines
PRESET_BASELINES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


def block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type (gguf-py's table, ggml's numbers)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def ggml_type(bits: int, in_features: int) -> str:
    """The type a ``bits``-wide ggml layer with rows of ``in_features`` is stored in (module docstring)."""
    if bits not in K_QUANT:
        raise PlanError(f"ggml methods take bits {sorted(K_QUANT)} (llama.cpp's Q2_K ... Q6_K and Q8_0), got {bits}")
    name = K_QUANT[bits]
    if in_features % block(name)[0]:
        name = FALLBACK.get(name, name)
    if in_features % block(name)[0]:
        raise PlanError(f"a layer with {in_features} inputs holds no ggml type of {bits} bits (rows must be a "
                        "multiple of 32); exclude it from the space")
    return name


def row_bytes(type_name: str, in_features: int) -> int:
    size, nbytes = block(type_name)
    return in_features // size * nbytes


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@lru_cache(maxsize=1)
def _lib():
    """libggml-base from llama-cpp-python's install (DependencyError when it is missing)."""
    llama_cpp = optional("llama_cpp", "llama.cpp's quantizer (method 'ggml')", LLAMA_CPP_INSTALL)
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


def _type_id(type_name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[type_name])


def _to_float(type_name: str):
    traits = _lib().ggml_get_type_traits(_type_id(type_name)).contents
    if (traits.blck_size, traits.type_size) != block(type_name):   # a ggml whose struct we do not know
        raise PlanError(f"this build of ggml describes {type_name} as ({traits.blck_size}, {traits.type_size}); "
                        f"autocomp expects {block(type_name)}")
    return _TO_FLOAT(traits.to_float)


def _chunks(rows: int) -> list[tuple[int, int]]:
    n = max(1, min(os.cpu_count() or 1, rows // 64 or 1))
    step = -(-rows // n)
    return [(start, min(step, rows - start)) for start in range(0, rows, step)]


def quantize_rows(weight: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """ggml's blocks of ``weight`` (``[out, in]``) in ``type_name``: uint8 ``[out, row_bytes]``."""
    lib = _lib()
    w = weight.detach().to(torch.float32).contiguous()
    rows, cols = w.shape
    out = torch.empty((rows, row_bytes(type_name, cols)), dtype=torch.uint8)
    im = imatrix.detach().to(torch.float32).contiguous() if imatrix is not None else None
    im_ptr = ctypes.cast(im.data_ptr(), ctypes.POINTER(ctypes.c_float)) if im is not None else None
    kind = _type_id(type_name)
    lib.ggml_quantize_init(kind)

    def run(span: tuple[int, int]) -> int:
        start, n = span
        src = ctypes.cast(w[start].data_ptr(), ctypes.POINTER(ctypes.c_float))
        return lib.ggml_quantize_chunk(kind, src, ctypes.c_void_p(out[start].data_ptr()), 0, n, cols, im_ptr)

    with ThreadPoolExecutor(len(_chunks(rows))) as pool:
        written = sum(pool.map(run, _chunks(rows)))
    if written != out.numel():
        raise PlanError(f"ggml wrote {written} bytes for a {rows} x {cols} {type_name} tensor, expected {out.numel()}")
    return out


def dequantize_rows(raw: torch.Tensor, type_name: str, in_features: int) -> torch.Tensor:
    """The float32 ``[out, in_features]`` weight ggml computes with from blocks ``raw``."""
    to_float = _to_float(type_name)
    raw = raw.contiguous()
    rows = raw.shape[0]
    out = torch.empty((rows, in_features), dtype=torch.float32)

    def run(span: tuple[int, int]) -> None:
        start, n = span
        to_float(ctypes.c_void_p(raw[start].data_ptr()), ctypes.cast(out[start].data_ptr(), ctypes.POINTER(ctypes.c_float)),
                 n * in_features)

    with ThreadPoolExecutor(len(_chunks(rows))) as pool:
        list(pool.map(run, _chunks(rows)))
    return out


def _ggml(weight, bits, group_size, symmetric, mask=None, stats=None, imatrix: bool = False):
    from autocomp.compressors.rtn import QuantizedWeight

    if mask is not None:
        raise PlanError("ggml types cannot hold pruned weights: use sparsity 0 with method ggml")
    type_name = ggml_type(bits, weight.shape[1])
    matrix = None
    if imatrix:
        if stats is None:
            raise PlanError("method ggml-imatrix needs calibration statistics (use 'ggml' for a layer without inputs)")
        matrix = stats.input_sq_norm / max(stats.n_tokens, 1)
    raw = quantize_rows(weight, type_name, matrix)
    deq = dequantize_rows(raw, type_name, weight.shape[1]).to(weight.dtype)
    return QuantizedWeight(weight=deq, codes=raw, scales=torch.empty(0, dtype=torch.float16), zeros=None, bits=bits,
                           group_size=block(type_name)[0], ggml_type=type_name)


@register_compressor("ggml", kind="quant", data_free_fallback="ggml", holds_pruned=False)
def ggml_quantize(weight, bits, group_size, symmetric, mask=None, stats=None):
    """llama.cpp's type of ``bits`` (module docstring), without an importance matrix."""
    return _ggml(weight, bits, group_size, symmetric, mask, stats)


@register_compressor("ggml-imatrix", kind="quant", needs_calibration=True, data_free_fallback="ggml",
                     holds_pruned=False)
def ggml_imatrix_quantize(weight, bits, group_size, symmetric, mask=None, stats=None):
    """llama.cpp's type of ``bits``, weighted by the layer's importance matrix."""
    return _ggml(weight, bits, group_size, symmetric, mask, stats, imatrix=True)
