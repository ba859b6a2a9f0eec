"""``packed``: autocomp's own file, one ``model.packed.safetensors`` of packed low-bit codes, fp16
scales, zero points and sparse metadata (:mod:`autocomp.deploy.packed_io`): bytes on disk match the
accounted size. :func:`autocomp.inputs.models.load_model` and :func:`autocomp.api.load_deployed` read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autocomp.exporters.registry import ExportFormat, ExportOptions, register_format


def _check(applied, options: ExportOptions) -> None:
    from autocomp.compressors.ggml import GGML_METHODS
    from autocomp.exporters.registry import refuse

    refuse([f"{name} is in llama.cpp's own blocks (method {plan.quantizer})" for name, plan in applied.per_layer.items()
            if plan.quantizer in GGML_METHODS], "the packed format cannot hold this configuration",
           "Export it with --format gguf (or compressed-tensors / float, which store those layers dequantized)")


def _write(folder: Path, applied, loaded, options: ExportOptions) -> dict[str, Any]:
    import torch

    from autocomp.deploy.packed_io import save_packed

    packed = save_packed(folder, applied.model, applied.targets, applied.compressed_weights(), applied.per_layer,
                         dtype=getattr(torch, options.dtype))
    return {"storage_dtype": options.dtype, "bytes_on_disk": packed.bytes_on_disk,
            "disk_vs_accounted_pct": 100.0 * packed.overhead}


def _load(folder: Path):
    import torch

    from autocomp.deploy.packed_io import load_packed

    return load_packed(folder, dtype=torch.float32)[0]


register_format(ExportFormat(
    "packed", "autocomp's packed file (low-bit codes on disk); autocomp.load_model / load_deployed read it",
    _write, _load, check=_check))
