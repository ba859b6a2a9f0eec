"""The late import of ``llama-cpp-python`` and the names autocomp uses for llama.cpp's types.

``llama-cpp-python`` has no wheel on PyPI: ``pip install 'autocomp[llamacpp]'`` compiles it (10-15
minutes on 2 cores; pip caches the wheel). Without it every llama.cpp command fails with one line
(:class:`~autocomp.errors.DependencyError` from :func:`autocomp._imports.optional`, exit 2).

llama.cpp logs through one process-wide callback; :func:`lib` replaces llama-cpp-python's printing
one with one that keeps the recent lines, so an error can quote what llama.cpp said
(:func:`recent_log`) instead of spilling its log over autocomp's output.
"""

from __future__ import annotations

import collections
import ctypes
from typing import Any

from autocomp._imports import LLAMA_CPP_INSTALL, optional
from autocomp.errors import PlanError


# the tensor types a search may choose (llama.cpp's CPU build quantizes and runs all of them)
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCK_32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")
I_QUANTS = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
FLOATS = ("F16", "BF16", "F32")
TYPES = K_QUANTS + BLOCK_32 + I_QUANTS + FLOATS
# llama.cpp refuses these without an importance matrix (their codebooks need the weighting)
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")

# llama-quantize's presets (llama_ftype names without LLAMA_FTYPE_MOSTLY_)
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
           "Q4_0", "Q5_0", "F16", "BF16")

_LOG: collections.deque[str] = collections.deque(maxlen=200)
_CALLBACK: Any = None     # kept alive: llama.cpp holds a raw pointer to it


def lib():
    """The ``llama_cpp`` module, with its log captured; DependencyError when it is not installed."""
    global _CALLBACK
    llama_cpp = optional("llama_cpp", "the llama.cpp engine (llama-cpp-python)", LLAMA_CPP_INSTALL)
    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def keep(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            _LOG.append(text.decode("utf-8", "replace"))

        llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
        _CALLBACK = keep
    return llama_cpp


def clear_log() -> None:
    _LOG.clear()


def recent_log(lines: int = 3) -> str:
    """The last non-empty lines llama.cpp logged, joined on one line (for an error message)."""
    text = "".join(_LOG).splitlines()
    kept = [line.strip() for line in text if line.strip()][-lines:]
    return " | ".join(kept) if kept else "llama.cpp logged nothing"


def type_id(name: str) -> int:
    """llama.cpp's ``ggml_type`` number of a tensor type name (``Q4_K``, ``q4_k``); PlanError for others
    (gguf-py numbers the types as ggml does)."""
    from gguf import GGMLQuantizationType

    key = str(name).upper()
    if key not in TYPES:
        raise PlanError(f"unknown GGUF tensor type {name!r}: use one of {', '.join(TYPES)}")
    return int(GGMLQuantizationType[key])


def preset_id(name: str) -> int:
    """llama.cpp's ``llama_ftype`` number of a ``llama-quantize`` preset name (``Q4_K_M``)."""
    key = str(name).upper()
    if key not in PRESETS:
        raise PlanError(f"unknown llama.cpp preset {name!r}: use one of {', '.join(PRESETS)}")
    return int(getattr(lib(), f"LLAMA_FTYPE_MOSTLY_{key}"))
