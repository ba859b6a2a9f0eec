"""What the ``autocomp llamacpp`` commands do, on a model named as everywhere else.

* :func:`reference_gguf`: the model as an unquantized GGUF file (F16), made once per model under
  ``$AUTOCOMP_CACHE/gguf-reference/``: a GGUF model (bundled or a file) is re-written by llama.cpp
  from its de-quantized values, a Hugging Face folder is written by autocomp's GGUF exporter.
* :func:`quantize_model`: the reference quantized by llama.cpp with a preset, per-tensor types and,
  when asked, an importance matrix from calibration windows.
* :func:`score_file`: perplexity and KL to the reference of any GGUF file of the model, on evaluation
  windows, from llama.cpp's logits (the reference's, once per windows, kept under
  ``$AUTOCOMP_CACHE/reference/``); and its prefill / decode times.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from autocomp.errors import PlanError


@dataclass(frozen=True)
class FileScore:
    path: str
    file_mb: float
    perplexity: float
    reference_perplexity: float
    kl: float
    prefill_ms: float
    decode_ms_per_token: float
    threads: int


def reference_gguf(loaded) -> Path:
    """The F16 GGUF file of ``loaded`` (a :class:`~autocomp.inputs.models.LoadedModel`), made once."""
    from autocomp.exporters.gguf_file import GGUF_FILE, source_gguf
    from autocomp.inputs.models import cache_root
    from autocomp.llamacpp.quantize import quantize

    path = cache_root() / "gguf-reference" / f"{loaded.fingerprint[:20]}-F16.gguf"
    if path.is_file():
        return path
    source = source_gguf(loaded)
    if source is not None:
        return quantize(source, path, preset="F16")
    from autocomp.config.plan import CompressionPlan, LayerPlan
    from autocomp.exporters import ExportOptions, get_format
    from autocomp.inputs.models import load_model
    from autocomp.pipeline.apply import apply_plan

    folder = path.with_name(f"{path.stem}-export")
    shutil.rmtree(folder, ignore_errors=True)      # what an interrupted earlier run left
    folder.mkdir(parents=True)
    fresh = load_model(str(loaded.folder))          # the weights as stored (``loaded`` may hold a trial's)
    dense = apply_plan(fresh, CompressionPlan(default=LayerPlan()))
    get_format("gguf").write(folder, dense, fresh, ExportOptions(dtype="float16"))
    (folder / GGUF_FILE).replace(path)
    shutil.rmtree(folder)
    return path


def parse_types(pairs: list[str]) -> dict[str, str]:
    """``["blk.0.ffn_down.weight=Q4_K", ...]`` -> a dict; PlanError naming a malformed entry."""
    out = {}
    for pair in pairs:
        name, sep, kind = pair.partition("=")
        if not sep or not name or not kind:
            raise PlanError(f"--type {pair!r} is not TENSOR=TYPE (for example blk.0.ffn_down.weight=Q4_K)")
        out[name.strip()] = kind.strip().upper()
    return out


def quantize_model(model: str, out: str | Path, preset: str, types: Mapping[str, str] | None = None,
                   imatrix_windows: int = 0, seq_len: int = 512, threads: int = 0) -> Path:
    from autocomp.inputs.data import WindowSpec, text_windows
    from autocomp.inputs.models import load_model
    from autocomp.llamacpp.binding import lib
    from autocomp.llamacpp.imatrix import importance_matrix
    from autocomp.llamacpp.quantize import quantize

    lib()                      # the one-line error before loading anything
    loaded = load_model(model)
    matrix = None
    if imatrix_windows:
        windows = text_windows(loaded.tokenizer, "wikitext2", "validation", WindowSpec(imatrix_windows, seq_len),
                               random=True)
        matrix = importance_matrix(loaded.model, windows.input_ids)
    return quantize(reference_gguf(loaded), out, preset=preset, types=types, imatrix=matrix, threads=threads)


def score_file(model: str, path: str | Path, eval_windows: int = 8, seq_len: int = 512, threads: int = 2,
               split: str = "test") -> FileScore:
    from autocomp.inputs.data import WindowSpec, text_windows
    from autocomp.inputs.models import load_model
    from autocomp.llamacpp.binding import lib
    from autocomp.llamacpp.quantize import tensor_types
    from autocomp.llamacpp.runtime import LlamaCppModel, measure, reference
    from autocomp.study.evaluate import cached_reference

    lib()
    path = Path(path)
    tensor_types(path)         # a GGUF file, or one line saying it is not
    loaded = load_model(model)
    windows = text_windows(loaded.tokenizer, "wikitext2", split, WindowSpec(eval_windows, seq_len), random=False)
    reference_file = reference_gguf(loaded)
    # the F16 file's llama.cpp logits on these windows, kept like the torch path's dense reference
    ref = cached_reference(f"llamacpp:{reference_file.name}:{windows.sha256}:64",
                           lambda: reference(reference_file, windows.input_ids, 64, threads))
    with LlamaCppModel(path, seq_len, threads) as llm:
        scores, _ = llm.score(windows.input_ids, ref)
    timing = measure(path, threads, 128, 16)
    return FileScore(str(path), path.stat().st_size / 1e6, scores.perplexity, ref.perplexity, scores.mean_kl,
                     timing.prefill_ms, timing.decode_ms_per_token, threads)
