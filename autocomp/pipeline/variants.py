"""Per-layer compressed variants, computed once and reused (the EvoPress "layer database").

A variant's key is the content of everything that determines it: the model's weight digest, the
layer name, the canonical layer plan, the calibration statistics' digest (for calibrated methods)
and the autocomp version. Two tiers:

* memory: least-recently-used, bounded by bytes, holding float weights ready to copy in;
* disk (optional, ``directory``): one safetensors file per variant, written to a temporary file in
  the same folder and renamed into place (atomic on POSIX), so concurrent workers can share one
  folder: two processes writing the same entry leave one valid file. Quantized variants are stored
  as their integer codes, fp16 scales, zero points and keep-mask (about a quarter of the float
  bytes); they are dequantized on load with the same element-wise float32 arithmetic as when they
  were made, so a hit is bit-identical to the computed weight.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from autocomp._version import __version__
from autocomp.pipeline.layer import CompressedWeight
from autocomp.config.plan import LayerPlan


def _needs_stats(plan: LayerPlan) -> bool:
    from autocomp.compressors.registry import compressor_needs_calibration

    return compressor_needs_calibration(plan.method)


def variant_key(fingerprint: str, layer: str, plan: LayerPlan, stats_digest: str | None) -> str:
    """Hex digest naming one variant (stats digest only counts for calibrated methods)."""
    payload = json.dumps([__version__, fingerprint, layer, plan.key(), stats_digest if _needs_stats(plan) else None])
    return hashlib.sha256(payload.encode()).hexdigest()


def _to_tensors(cw: CompressedWeight) -> dict[str, torch.Tensor]:
    if cw.quant is None:
        out = {"weight": cw.weight.contiguous()}
    else:
        out = {"codes": cw.quant.codes, "scales": cw.quant.scales,
               "group_size": torch.tensor([cw.quant.group_size]), "bits": torch.tensor([cw.quant.bits]),
               "dtype_code": torch.tensor([_dtype_code(cw.weight.dtype)])}
        if cw.quant.zeros is not None:
            out["zeros"] = cw.quant.zeros
        else:
            out["zero_const"] = torch.tensor([2 ** (cw.quant.bits - 1)])
    if cw.mask is not None:
        out["mask"] = cw.mask.contiguous()
    return out


_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)


def _compressed_from_tensors(t: dict[str, torch.Tensor]) -> CompressedWeight:
    from autocomp.compressors.rtn import QuantizedWeight, dequantize_codes

    mask = t.get("mask")
    if "weight" in t:
        return CompressedWeight(t["weight"], mask, None)
    gs = int(t["group_size"][0])
    # 0: an asymmetric variant written before bit widths were stored (get_compressed recomputes it)
    bits = int(t["bits"][0]) if "bits" in t else int(t["zero_const"][0]).bit_length() if "zero_const" in t else 0
    weight = dequantize_codes(t["codes"], t["scales"], t.get("zeros"), bits, gs, mask).contiguous()
    quant = QuantizedWeight(weight, t["codes"], t["scales"], t.get("zeros"), bits, gs)
    return CompressedWeight(weight.to(_DTYPES[int(t["dtype_code"][0])]).contiguous(), mask, quant)


def check_writable(directory: Path) -> None:
    """Refuse a variant folder that cannot be created or written, before any work is done."""
    from autocomp.errors import StorageError

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(f"variant cache folder {directory} is not writable ({exc.strerror or exc}); "
                           "pass --variant-cache with a writable folder, or --variant-cache none to keep "
                           "variants in memory only") from None


class LayerVariantCache:
    """Two-tier (memory LRU, optional disk) map from variant key to compressed ``[out, in]`` weight."""

    def __init__(self, max_bytes: int = 2 << 30, directory: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            check_writable(self.directory)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0          # memory hits
        self.disk_hits = 0
        self.misses = 0        # computed

    key = staticmethod(variant_key)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def _read(self, key: str) -> torch.Tensor | None:
        cw = self._read_compressed(key)
        return None if cw is None else cw.weight

    def _read_compressed(self, key: str) -> CompressedWeight | None:
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            value = _compressed_from_tensors(load_file(str(path)))
        except (SafetensorError, OSError, KeyError, IndexError, RuntimeError):  # torn or foreign: recompute
            return None
        try:
            os.utime(path)  # the modification time orders entries for prune_disk: least recently used first
        except OSError:
            pass
        return value

    def _write(self, key: str, cw: CompressedWeight) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(_to_tensors(cw), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(self, key: str, compute: Callable[[], CompressedWeight], persist: bool = True) -> torch.Tensor:
        """The variant's float weight: from memory, else disk, else ``compute()`` (then stored;
        on disk only when ``persist``: callers persist what is expensive to recompute)."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self._read(key) if persist else None
        if value is not None:
            self.disk_hits += 1
        else:
            self.misses += 1
            cw = compute()
            value = cw.weight
            if persist:
                self._write(key, cw)
        self._remember(key, value)
        return value

    def get_compressed(self, key: str, compute: Callable[[], CompressedWeight], persist: bool = True) -> CompressedWeight:
        """The whole variant (codes, scales, mask), for packing or kernels: from disk when stored there
        (the memory tier keeps float weights only), else ``compute()`` (stored on disk when ``persist``)."""
        cw = self._read_compressed(key) if persist else None
        if cw is None or (cw.quant is not None and cw.quant.bits == 0):
            cw = compute()
            if persist:
                self._write(key, cw)
        return cw

    def __len__(self) -> int:
        return len(self._entries)

    def disk_entries(self) -> list[tuple[Path, int, float]]:
        """``(path, bytes, last use)`` of every variant file on disk, least recently used first."""
        if self.directory is None or not self.directory.exists():
            return []
        out = []
        for path in self.directory.glob("*/*.safetensors"):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            out.append((path, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def prune_disk(self, max_bytes: int) -> tuple[int, int]:
        """Delete the least recently used variant files until the folder holds at most ``max_bytes``.
        Safe while other workers use the folder (a deleted variant is recomputed on its next use).
        Returns (files removed, bytes freed)."""
        entries = self.disk_entries()
        total = sum(size for _, size, _ in entries)
        removed = freed = 0
        for path, size, _ in entries:
            if total <= max_bytes:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            total -= size
            removed, freed = removed + 1, freed + size
        return removed, freed

    @property
    def nbytes(self) -> int:
        return self._bytes
