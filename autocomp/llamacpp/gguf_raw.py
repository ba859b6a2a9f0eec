"""A GGUF file's layout read at the byte level.

gguf-py's reader parses every metadata value into numpy views: for gemma3-270m's 262,144-token
vocabulary that takes about 25 s per file. Reading a file's tensor types, sizes and offsets only needs
the tensor table (name, dimensions, type, offset) and the metadata as opaque bytes, which this module
reads in well under a second.

Format (GGUF v2/v3, little-endian): ``GGUF``, version u32, tensor count u64, metadata count u64; each
metadata entry is a string key, a u32 value type and the value (arrays: element type u32, count u64,
elements); each tensor entry is a string name, u32 dimension count, u64 dimensions (innermost first),
u32 ggml type and u64 offset from the data start; the data start and every tensor are aligned to
``general.alignment`` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from autocomp.errors import ModelLoadError

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class RawTensor:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int        # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class RawLayout:
    path: Path
    version: int
    metadata: tuple[tuple[str, bytes], ...]    # (key, the entry's bytes: key, type, value)
    alignment: int
    tensors: dict[str, RawTensor]
    data_start: int


class _Cursor:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8")

    def skip_value(self, kind: int) -> None:
        if kind in _FIXED:
            self.pos += _FIXED[kind]
        elif kind == _STRING:
            n = self.take("Q")
            self.pos += n
        elif kind == _ARRAY:
            sub, count = self.take("I"), self.take("Q")
            if sub in _FIXED:
                self.pos += _FIXED[sub] * count
            else:
                for _ in range(count):
                    self.skip_value(sub)
        else:
            raise ValueError(f"unknown metadata value type {kind}")


def tensor_bytes(ggml_type: int, numel: int) -> int:
    """Bytes of ``numel`` values stored as ggml type ``ggml_type`` (whole blocks)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return numel // block * size


def _numel(ne: tuple[int, ...]) -> int:
    n = 1
    for d in ne:
        n *= d
    return n


def read_layout(path: str | Path) -> RawLayout:
    """The layout of the GGUF file at ``path``; ModelLoadError when it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(min(size, 64 << 20))
            cur = _Cursor(head)
            if cur.take("4s") != b"GGUF":
                raise ValueError("no GGUF magic")
            version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
            metadata, alignment = [], 32
            for _ in range(n_kv):
                start = cur.pos
                key, kind = cur.string(), cur.take("I")
                if key == "general.alignment" and kind == _UINT32:
                    alignment = struct.unpack_from("<I", head, cur.pos)[0]
                cur.skip_value(kind)
                metadata.append((key, head[start:cur.pos]))
            infos = []
            for _ in range(n_tensors):
                name, n_dims = cur.string(), cur.take("I")
                ne = tuple(cur.take("Q") for _ in range(n_dims))
                infos.append((name, ne, cur.take("I"), cur.take("Q")))
    except (struct.error, ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a GGUF file ({exc}); pass a .gguf file llama.cpp wrote") from exc
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {name: RawTensor(name, ne, kind, data_start + offset, tensor_bytes(kind, _numel(ne)))
               for name, ne, kind, offset in infos}
    end = max((t.offset + t.nbytes for t in tensors.values()), default=data_start)
    if end > size:
        raise ModelLoadError(f"{path} is truncated ({size} bytes, its tensors end at {end}): write it again")
    return RawLayout(path, version, tuple(metadata), alignment, tensors, data_start)
