"""``float``: the dequantized weights in float32 as a plain Hugging Face folder:
``AutoModelForCausalLM.from_pretrained`` loads it; bytes on disk are not the accounted size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autocomp.exporters.registry import ExportFormat, ExportOptions, register_format


def _write(folder: Path, applied, loaded, options: ExportOptions) -> dict[str, Any]:
    applied.model.save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"bytes_on_disk": size,
            "note": "weights are stored dequantized in float32; the accounted size is what the packed format takes"}


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


register_format(ExportFormat(
    "float", "dequantized float32 Hugging Face folder (from_pretrained; no size saving on disk)", _write, _load))
