"""Per-tensor GGUF variants: the reference quantized once per type, candidates assembled from them.

A search over GGUF type mixes asks for many files that differ in a few tensors. Quantizing the
whole reference for each (about 20 s for gemma3-270m on 2 cores, most of it the embedding) is
replaced by one llama.cpp quantization per type, in which every tensor that can hold the type takes
it (with the importance matrix, when given); a candidate is then written by copying each tensor's
bytes from the variant of its type (``assemble``: a file copy, under a second; see
:mod:`.gguf_raw`). Each tensor is quantized independently of the others in llama.cpp, so an assembled file is byte-for-byte the file
``llama-quantize`` writes with the same per-tensor types (a test checks it).

Which types a tensor can take follows from its row length: K-quants and the 256-block I-quants need
rows that are a multiple of 256, the 32-block types a multiple of 32 (llama.cpp would silently fall
back to another type otherwise; here such a choice is never offered). Sizes are exact without writing
anything: a tensor's bytes are its blocks times the type's block bytes.

Variants are kept under ``$AUTOCOMP_CACHE/gguf-variants/``, named by the reference (its header
bytes, size and modification time), the type and the importance matrix, each written under a temporary name and renamed (complete or absent).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from autocomp.errors import EngineError, PlanError
from autocomp.llamacpp import gguf_raw
from autocomp.llamacpp.binding import TYPES
from autocomp.llamacpp.imatrix import digest as imatrix_digest
from autocomp.llamacpp.quantize import quantize


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]      # ggml dimensions, innermost (row length) first
    kind: str                # its type in the reference

    @property
    def numel(self) -> int:
        return int(np.prod(self.ne))

    @property
    def searchable(self) -> bool:
        """A matrix (norms and biases keep the reference's type)."""
        return len(self.ne) == 2 and self.name.endswith(".weight")


def _ggml(kind: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[kind])


def holds(kind: str, row: int) -> bool:
    """Whether rows of ``row`` values split into whole blocks of ``kind``."""
    import gguf

    return row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0] == 0


def _file_key(path: Path, layout: gguf_raw.RawLayout) -> str:
    """Identifies the reference's content: its header bytes, size and modification time (hashing
    the whole file would take seconds per process)."""
    stat = path.stat()
    h = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(layout.data_start))
    return h.hexdigest()[:16]


class GGUFVariants:
    """The tensors of one reference GGUF file (F16 / BF16 / F32) and its quantized variants."""

    def __init__(self, reference: str | Path, cache: str | Path, imatrix: Mapping[str, np.ndarray] | None = None,
                 threads: int = 0) -> None:
        self.reference = Path(reference)
        self.layout = gguf_raw.read_layout(self.reference)
        self.tensors = {t.name: TensorInfo(t.name, t.ne, _type_name(t.ggml_type)) for t in self.layout.tensors.values()}
        self.cache = Path(cache)
        self.imatrix = dict(imatrix) if imatrix else None
        self.threads = threads
        self._key = f"{_file_key(self.reference, self.layout)}-{imatrix_digest(self.imatrix) if self.imatrix else 'plain'}"
        self._variants: dict[str, gguf_raw.RawLayout] = {}

    @property
    def searchable(self) -> list[str]:
        return [name for name, t in self.tensors.items() if t.searchable]

    def choices(self, name: str, kinds: Sequence[str]) -> list[str]:
        """The types of ``kinds`` the tensor ``name`` can hold (its row length)."""
        return [k for k in kinds if holds(k, self.tensors[name].ne[0])]

    def tensor_bytes(self, name: str, kind: str | None = None) -> int:
        t = self.tensors[name]
        return gguf_raw.tensor_bytes(_ggml(kind or t.kind), t.numel)

    def _planned(self, assignment: Mapping[str, str]) -> list[gguf_raw.RawTensor]:
        out = []
        for name, t in self.layout.tensors.items():
            kind = assignment.get(name)
            out.append(t if kind is None else gguf_raw.RawTensor(name, t.ne, _ggml(kind), 0, self.tensor_bytes(name, kind)))
        return out

    def file_bytes(self, assignment: Mapping[str, str]) -> int:
        """The exact size of the file :meth:`assemble` writes for ``assignment``."""
        return gguf_raw.file_bytes(self.layout, self._planned(self._normal(assignment)))

    def _normal(self, assignment: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for name, kind in assignment.items():
            if name not in self.tensors:
                raise PlanError(f"{self.reference} has no tensor {name!r}")
            kind = str(kind).upper()
            if kind not in TYPES:
                raise PlanError(f"unknown GGUF tensor type {kind!r}: use one of {', '.join(TYPES)}")
            if kind == self.tensors[name].kind:
                continue
            if not self.tensors[name].searchable:
                raise PlanError(f"{name} is not a weight matrix: its type stays {self.tensors[name].kind}")
            if not holds(kind, self.tensors[name].ne[0]):
                raise PlanError(f"{name} has rows of {self.tensors[name].ne[0]} values, which {kind} blocks do not "
                                f"divide: choose one of {', '.join(self.choices(name, TYPES))}")
            out[name] = kind
        return out

    def variant(self, kind: str) -> gguf_raw.RawLayout:
        """The reference with every matrix that can hold ``kind`` quantized to it (made once)."""
        if kind in self._variants:
            return self._variants[kind]
        path = self.cache / "gguf-variants" / f"{self._key}-{kind}.gguf"
        if not path.is_file():
            types = {n: kind for n in self.searchable if holds(kind, self.tensors[n].ne[0])}
            if not types:
                raise PlanError(f"no matrix of {self.reference} can hold {kind}")
            # any quantized preset: every tensor it would choose is overridden (an F16 preset ignores overrides)
            tmp = path.with_name(f".{path.name}.partial")
            quantize(self.reference, tmp, preset="Q8_0", types=types, imatrix=self.imatrix, threads=self.threads)
            wrong = {n: t.ggml_type for n, t in gguf_raw.read_layout(tmp).tensors.items()
                     if n in types and t.ggml_type != _ggml(kind)}
            if wrong:
                tmp.unlink()
                raise EngineError(f"llama.cpp wrote {len(wrong)} tensors of the {kind} variant of {self.reference} in "
                                  f"other types ({', '.join(f'{n}: {_type_name(k)}' for n, k in list(wrong.items())[:3])})")
            tmp.replace(path)
        self._variants[kind] = gguf_raw.read_layout(path)
        return self._variants[kind]

    def assemble(self, assignment: Mapping[str, str], out: str | Path) -> Path:
        """Write ``out``: each tensor of ``assignment`` from its type's variant, the rest as in the
        reference (complete or absent)."""
        assignment = self._normal(assignment)
        sources = []
        for name, t in self.layout.tensors.items():
            kind = assignment.get(name)
            if kind is None:
                sources.append((t, self.reference))
                continue
            layout = self.variant(kind)
            held = layout.tensors[name]
            if held.ggml_type != _ggml(kind):    # a variant file changed after it was checked
                raise EngineError(f"{layout.path} holds {name} as {_type_name(held.ggml_type)}, not {kind}: "
                                  "delete it and run again")
            sources.append((held, layout.path))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            gguf_raw.write(tmp, self.layout, sources)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        return out


def _type_name(ggml_type: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(ggml_type).name
