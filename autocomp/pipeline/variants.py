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

Integrity: every file carries the SHA-256 of its tensors (names, dtypes, shapes, bytes) in its
safetensors metadata, checked on every read (:mod:`autocomp.cachefile`). A file that fails the check (a flipped bit, a torn or
foreign write, no digest), or that holds a weight of another shape or dtype than the layer's, is a
*bad entry*: it is never used, the variant is recomputed and rewritten, and a warning counting the
bad entries so far is logged (logger ``autocomp.variants``; :attr:`LayerVariantCache.bad_entries`).

Ownership: a folder becomes a variant cache when the cache first writes to it, which leaves the
marker file :data:`MARKER` in its root. :meth:`LayerVariantCache.prune_disk` (``autocomp cache
--max-gb``) refuses a folder without the marker and only ever deletes files of the cache's own
layout (``<2 hex>/<64 hex>.safetensors``), so pointing it at a folder of models deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from autocomp._version import __version__
from autocomp.cachefile import load_tensors, save_tensors
from autocomp.pipeline.layer import CompressedWeight
from autocomp.config.plan import LayerPlan

MARKER = ".autocomp-variant-cache"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
_log = logging.getLogger("autocomp.variants")


def _needs_stats(plan: LayerPlan) -> bool:
    from autocomp.compressors.registry import compressor_needs_calibration

    return compressor_needs_calibration(plan.method)


def variant_key(fingerprint: str, layer: str, plan: LayerPlan, stats_digest: str | None) -> str:
    """Hex digest naming one variant (stats digest only counts for calibrated methods; llama.cpp's
    types count their fallback table, which decides the type of a row length)."""
    from autocomp.compressors.ggml import FALLBACK, GGML_METHODS

    parts = [__version__, fingerprint, layer, plan.key(), stats_digest if _needs_stats(plan) else None]
    if plan.quantizer in GGML_METHODS:
        parts.append(sorted(FALLBACK.items()))
    payload = json.dumps(parts)
    return hashlib.sha256(payload.encode()).hexdigest()


def _to_tensors(cw: CompressedWeight) -> dict[str, torch.Tensor]:
    if cw.quant is None:
        out = {"weight": cw.weight.contiguous()}
    else:
        out = {"codes": cw.quant.codes, "scales": cw.quant.scales,
               "group_size": torch.tensor([cw.quant.group_size]), "bits": torch.tensor([cw.quant.bits]),
               "dtype_code": torch.tensor([_dtype_code(cw.weight.dtype)])}
        if cw.quant.ggml_type is not None:     # llama.cpp's blocks: the type and the row length rebuild it
            out["ggml_type"] = torch.tensor([GGML_TYPES.index(cw.quant.ggml_type)])
            out["in_features"] = torch.tensor([cw.weight.shape[1]])
        elif cw.quant.zeros is not None:
            out["zeros"] = cw.quant.zeros
        else:
            out["zero_const"] = torch.tensor([2 ** (cw.quant.bits - 1)])
    if cw.mask is not None:
        out["mask"] = cw.mask.contiguous()
    return out


_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# llama.cpp types a variant may hold (method ggml), by their stored index: append only
GGML_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "Q5_0", "Q5_1", "Q4_0", "Q4_1"]


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)


def is_entry_path(directory: Path, path: Path) -> bool:
    """True for a file of the cache's own layout: ``<directory>/<2 hex>/<64 hex>.safetensors`` whose
    folder is the first two characters of its name."""
    return (path.parent.parent == directory and _ENTRY_NAME.fullmatch(path.name) is not None
            and path.parent.name == path.name[:2])


def _compressed_from_tensors(t: dict[str, torch.Tensor]) -> CompressedWeight:
    from autocomp.compressors.rtn import QuantizedWeight, dequantize_codes

    mask = t.get("mask")
    if "weight" in t:
        return CompressedWeight(t["weight"], mask, None)
    gs = int(t["group_size"][0])
    if "ggml_type" in t:
        from autocomp.compressors.ggml import dequantize_rows

        kind, bits = GGML_TYPES[int(t["ggml_type"][0])], int(t["bits"][0])
        weight = dequantize_rows(t["codes"], kind, int(t["in_features"][0]))
        quant = QuantizedWeight(weight, t["codes"], t["scales"], None, bits, gs, ggml_type=kind)
        return CompressedWeight(weight.to(_DTYPES[int(t["dtype_code"][0])]).contiguous(), None, quant)
    # 0: an asymmetric variant written before bit widths were stored (get_compressed recomputes it)
    bits = int(t["bits"][0]) if "bits" in t else int(t["zero_const"][0]).bit_length() if "zero_const" in t else 0
    weight = dequantize_codes(t["codes"], t["scales"], t.get("zeros"), bits, gs, mask).contiguous()
    quant = QuantizedWeight(weight, t["codes"], t["scales"], t.get("zeros"), bits, gs)
    return CompressedWeight(weight.to(_DTYPES[int(t["dtype_code"][0])]).contiguous(), mask, quant)


def check_writable(directory: Path) -> None:
    """Refuse a variant folder that cannot be created or written, before any work is done; a folder
    that passes is marked as a variant cache (:data:`MARKER`)."""
    from autocomp.errors import StorageError

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
        marker = directory / MARKER
        if not marker.exists():
            marker.write_text("autocomp layer-variant cache: files <2 hex>/<64 hex>.safetensors in this folder "
                              "were written by autocomp and may be deleted by 'autocomp cache --max-gb'\n")
    except OSError as exc:
        raise StorageError(f"variant cache folder {directory} is not writable ({exc.strerror or exc}); "
                           "pass --variant-cache with a writable folder, or --variant-cache none to keep "
                           "variants in memory only") from None


def is_cache_folder(directory: Path) -> bool:
    """True when ``directory`` holds the marker that the variant cache writes in its root."""
    return (Path(directory) / MARKER).is_file()


Expected = tuple[tuple[int, ...], torch.dtype]   # (shape, dtype) of the layer's dense weight


class LayerVariantCache:
    """Two-tier (memory LRU, optional disk) map from variant key to compressed ``[out, in]`` weight.

    ``max_bytes``: the memory tier's bound (StorageError when negative). ``directory``: the disk tier;
    ``create`` (default) makes it, checks it is writable and marks it as a cache; ``create=False``
    opens it only to count and prune (StorageError when it is not a marked cache folder)."""

    def __init__(self, max_bytes: int = 2 << 30, directory: str | Path | None = None, create: bool = True) -> None:
        from autocomp.errors import StorageError

        if max_bytes < 0:
            raise StorageError(f"the memory for cached layers (--cache-mb) must be >= 0, got {max_bytes / (1 << 20):g} MB")
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            if create:
                check_writable(self.directory)
            elif not is_cache_folder(self.directory):
                raise StorageError(f"{self.directory} is not a variant cache folder (no {MARKER} file that autocomp "
                                   "writes in the folders it caches variants in); nothing was deleted; pass --dir "
                                   "with the folder that searches use (--variant-cache)")
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0          # memory hits
        self.disk_hits = 0
        self.misses = 0        # computed
        self.bad_entries = 0   # disk entries refused (failed digest, foreign shape/dtype) and recomputed

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

    def _read(self, key: str, expect: Expected | None = None) -> torch.Tensor | None:
        cw = self._read_compressed(key, expect)
        return None if cw is None else cw.weight

    def _bad(self, path: Path, why: str) -> None:
        self.bad_entries += 1
        _log.warning("autocomp: warning: variant cache entry %s %s; recomputed (%d bad entr%s in this process)",
                     path, why, self.bad_entries, "y" if self.bad_entries == 1 else "ies")

    def _read_compressed(self, key: str, expect: Expected | None = None) -> CompressedWeight | None:
        """The stored variant, or None when there is none or it is a bad entry (module docstring)."""
        if self.directory is None:
            return None
        path = self._path(key)
        tensors, why = load_tensors(path)
        if tensors is None:
            if why is not None:
                self._bad(path, why)
            return None
        try:
            value = _compressed_from_tensors(tensors)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:   # checked, but not a variant
            self._bad(path, f"is not a layer variant ({type(exc).__name__})")
            return None
        if expect is not None and (tuple(value.weight.shape) != tuple(expect[0]) or value.weight.dtype != expect[1]):
            self._bad(path, f"holds a {tuple(value.weight.shape)} {value.weight.dtype} weight, not the layer's "
                            f"{tuple(expect[0])} {expect[1]} (a foreign file)")
            return None
        try:
            os.utime(path)  # the modification time orders entries for prune_disk: least recently used first
        except OSError:
            pass
        return value

    def _write(self, key: str, cw: CompressedWeight) -> None:
        if self.directory is None:
            return
        save_tensors(self._path(key), _to_tensors(cw))   # a failed write (disk full) leaves it in memory only

    def get_or_compute(self, key: str, compute: Callable[[], CompressedWeight], persist: bool = True,
                       expect: Expected | None = None) -> torch.Tensor:
        """The variant's float weight: from memory, else disk, else ``compute()`` (then stored;
        on disk only when ``persist``: callers persist what is expensive to recompute).
        ``expect``: the layer's ``(shape, dtype)``; a disk entry of another one is not used."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self._read(key, expect) if persist else None
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

    def get_compressed(self, key: str, compute: Callable[[], CompressedWeight], persist: bool = True,
                       expect: Expected | None = None) -> CompressedWeight:
        """The whole variant (codes, scales, mask), for packing or kernels: from disk when stored there
        (the memory tier keeps float weights only), else ``compute()`` (stored on disk when ``persist``).
        ``expect`` as for :meth:`get_or_compute`."""
        cw = self._read_compressed(key, expect) if persist else None
        if cw is None or (cw.quant is not None and cw.quant.bits == 0):
            cw = compute()
            if persist:
                self._write(key, cw)
        return cw

    def __len__(self) -> int:
        return len(self._entries)

    def disk_entries(self) -> list[tuple[Path, int, float]]:
        """``(path, bytes, last use)`` of every variant file on disk (files of the cache's own layout
        only), least recently used first."""
        if self.directory is None or not self.directory.exists():
            return []
        out = []
        for path in self.directory.glob("*/*.safetensors"):
            if not is_entry_path(self.directory, path):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            out.append((path, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def prune_disk(self, max_bytes: int) -> tuple[int, int]:
        """Delete the least recently used variant files until the folder holds at most ``max_bytes``.
        Safe while other workers use the folder (a deleted variant is recomputed on its next use).
        Only files of the cache's own layout in a marked cache folder are ever deleted (StorageError
        for a folder without the marker). Returns (files removed, bytes freed)."""
        from autocomp.errors import StorageError

        if self.directory is None:
            return 0, 0
        if not is_cache_folder(self.directory):
            raise StorageError(f"{self.directory} is not a variant cache folder (no {MARKER} file); nothing was deleted")
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
