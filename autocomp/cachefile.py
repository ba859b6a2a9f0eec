"""Cached tensor files that are checked before use: what autocomp keeps under ``$AUTOCOMP_CACHE``
(layer variants, dense references, teacher top-k targets) is recomputable, so a file that cannot be
trusted is never used.

:func:`save_tensors` writes a safetensors file (a temporary file in the same folder, renamed into
place: a reader never sees half a file) whose metadata holds :func:`tensors_digest` of its
content. :func:`load_tensors` returns the tensors only when the digest matches; otherwise (a flipped
bit, a torn or foreign file, a file without digest) it logs a warning (logger ``autocomp.cache``)
and returns None, and the caller recomputes and writes the file again. A write that fails (disk
full, read-only folder) is logged and skipped: the caller keeps its result in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch

DIGEST_KEY = "autocomp_sha256"
_log = logging.getLogger("autocomp.cache")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a file's content: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """``(tensors, None)`` of a checked file; ``(None, why)`` for a bad one; ``(None, None)`` when
    there is no file."""
    if not path.exists():
        return None, None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = (fh.metadata() or {}).get(DIGEST_KEY)
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        return None, f"cannot be read ({type(exc).__name__})"
    if stored is None:
        return None, "has no digest"
    if stored != tensors_digest(tensors):
        return None, "fails its integrity check (digest mismatch)"
    return tensors, None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Write ``tensors`` with their digest, atomically; False (and a warning) when the write fails."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:12]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata={DIGEST_KEY: tensors_digest(tensors)})
        os.replace(tmp, path)
        return True
    except (OSError, SafetensorError) as exc:   # disk full, quota, read-only (safetensors wraps the OSError)
        _log.warning("autocomp: warning: cannot write cache file %s (%s); kept in memory only", path, exc)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def cached_tensors(path: Path, compute, what: str) -> dict[str, torch.Tensor]:
    """The checked tensors of ``path``, else ``compute()`` written there (a bad file is reported)."""
    tensors, why = load_tensors(path)
    if tensors is not None:
        return tensors
    if why is not None:
        _log.warning("autocomp: warning: cached %s %s %s; recomputed", what, path, why)
    tensors = compute()
    save_tensors(path, tensors)
    return tensors


def public_file(path: str | Path) -> None:
    """Give a written file the usual permissions, ``0666`` less the umask (``mkstemp`` and some
    writers make files private; an export is an ordinary file)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
