"""llama.cpp's ``llama-quantize`` presets as a study's baselines.

A space of llama.cpp's own types (methods ``ggml``, ``ggml-imatrix``) may name presets
(``presets: [Q2_K, Q3_K_M, Q4_K_M, ...]``). Each preset's per-tensor types are llama.cpp's: the
reference F16 file is quantized once with the preset and its tensor types read back (kept beside the
reference in ``$AUTOCOMP_CACHE/gguf-reference/``). Each type is then written as the layer plan of the
space that stores it (bits of the type's width: ``Q5_0`` on a row of 640 inputs is the 4-bit
K-quant's fallback), and the plan is evaluated like any trial and stored as a finished baseline
trial labelled ``llama.cpp preset <name>``. Quantized with the space's method, a preset baseline is
what ``llama-quantize --imatrix`` writes with the study's importance matrix (the blocks are
byte-identical: ``tests/test_llamacpp.py``), so the front shows what the search adds over a preset.
A preset with a type no ggml width gives is skipped with a message.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from autocomp.compressors.ggml import K_QUANT, PRESET_BASELINES, ggml_type

if TYPE_CHECKING:
    from autocomp.config.plan import LayerPlan
    from autocomp.config.space import SearchSpace
    from autocomp.inputs.targets import Target

__all__ = ["PRESET_BASELINES", "bits_of", "preset_plan", "preset_types"]

FLOAT_TYPES = ("F16", "BF16", "F32")


def preset_types(reference: Path, preset: str) -> dict[str, str]:
    """GGUF tensor name -> type that llama.cpp's ``preset`` gives each tensor of ``reference``."""
    from autocomp.llamacpp.quantize import quantize, tensor_types

    kept = reference.with_name(f"{reference.stem}-{preset}-types.json")
    if kept.is_file():
        return json.loads(kept.read_text())
    with tempfile.TemporaryDirectory(prefix="autocomp-preset-", dir=reference.parent) as work:
        types = tensor_types(quantize(reference, Path(work) / "q.gguf", preset=preset))
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(json.dumps(types, indent=1, sort_keys=True))
    tmp.replace(kept)
    return types


def bits_of(type_name: str, in_features: int) -> int | None:
    """The width whose ggml type on rows of ``in_features`` is ``type_name`` (16 for a float type),
    None when no width gives it."""
    if type_name in FLOAT_TYPES:
        return 16
    return next((b for b in sorted(K_QUANT) if ggml_type(b, in_features) == type_name), None)


def preset_plan(types: Mapping[str, str], targets: Sequence["Target"], gguf_name: Callable[[str], str | None],
                space: "SearchSpace") -> dict[str, "LayerPlan"] | str:
    """The per-layer plan, in the space's methods, that stores each target as ``types`` does (at any
    width the methods have: a baseline need not be one of the space's choices), or why it cannot."""
    plan = {}
    for t in targets:
        name = gguf_name(f"{t.name}.weight")
        kind = types.get(name) if name is not None else None
        if kind is None:
            return f"{t.name} has no tensor in the preset's file"
        bits = bits_of(kind, t.in_features)
        if bits is None:
            return f"{name} is {kind}, which no ggml width gives on its {t.in_features} inputs"
        plan[t.name] = space.layer_plan({"bits": bits}, data_free_only=t.stats_module is None)
    return plan
