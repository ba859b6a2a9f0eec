"""GGUF files quantized by llama.cpp's own quantizer (``llama_model_quantize``), per tensor.

``quantize(source, out, preset=..., types={tensor: type}, imatrix=...)`` is ``llama-quantize``
with ``--tensor-type`` overrides for exact tensor names and ``--imatrix``: the preset chooses every
tensor that ``types`` does not name (llama.cpp's own mix logic), an override fixes a tensor's type.
A type a tensor's rows cannot hold (K-quants need rows that are a multiple of 256) falls back, in
llama.cpp, to a 32-block type; :func:`tensor_types` reads back what was written.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from autocomp.errors import EngineError, ModelLoadError
from autocomp.llamacpp.binding import NEEDS_IMATRIX, clear_log, lib, preset_id, recent_log, type_id
from autocomp.llamacpp.gguf_raw import read_layout


def tensor_types(path: str | Path) -> dict[str, str]:
    """Every tensor of the GGUF file at ``path`` and its type name (ModelLoadError when it is not a
    GGUF file); from the byte-level header, not gguf-py's reader, which parses the whole vocabulary."""
    import gguf

    return {t.name: gguf.GGMLQuantizationType(t.ggml_type).name for t in read_layout(path).tensors.values()}


def quantize(source: str | Path, out: str | Path, *, preset: str = "Q8_0", types: Mapping[str, str] | None = None,
             imatrix: Mapping[str, np.ndarray] | None = None, threads: int = 0) -> Path:
    """Write ``out`` from the GGUF file ``source`` (F32/F16/BF16, or quantized: re-quantized from its
    de-quantized values). ``types`` maps exact tensor names to type names; ``imatrix`` maps tensor names
    to per-input-column importances (see :mod:`autocomp.llamacpp.imatrix`). Written to a temporary
    name and renamed: ``out`` is complete or absent."""
    llama_cpp = lib()
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise ModelLoadError(f"GGUF file {source} does not exist")
    types = dict(types or {})
    missing = sorted(set(types) - set(tensor_types(source)))
    if missing:
        raise EngineError(f"{source} has no tensor named {', '.join(missing[:5])}: name tensors as the GGUF file does "
                          "(token_embd.weight, blk.0.attn_q.weight, ...)")
    ids = {name: type_id(kind) for name, kind in types.items()}
    lacking = sorted({kind.upper() for kind in types.values()} & set(NEEDS_IMATRIX))
    if lacking and not imatrix:
        raise EngineError(f"llama.cpp quantizes {', '.join(lacking)} only with an importance matrix: give one "
                          "(calibration data) or choose other types")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = preset_id(preset)
    params.nthread = threads or (os.cpu_count() or 1)
    params.allow_requantize = True
    keep = []        # the C strings and arrays must outlive the call
    if ids:
        overrides = (llama_cpp.llama_model_tensor_override * (len(ids) + 1))()
        for slot, (name, kind) in zip(overrides, ids.items()):
            pattern = f"^{re.escape(name)}$".encode()
            keep.append(pattern)
            slot.pattern, slot.type = pattern, kind
        overrides[len(ids)].pattern = None     # the terminator
        params.tt_overrides = overrides
        keep.append(overrides)
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for slot, (name, values) in zip(entries, imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            if not np.isfinite(data).all():
                raise EngineError(f"the importance matrix of {name} is not finite: recompute it from the calibration data")
            encoded = name.encode()
            keep += [data, encoded]
            slot.name, slot.size = encoded, data.size
            slot.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep.append(entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    clear_log()
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise EngineError(f"llama.cpp could not quantize {source} ({preset}"
                              f"{', with overrides' if ids else ''}): {recent_log()}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
