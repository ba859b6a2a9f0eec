"""``gguf``: one ``model.gguf`` file for llama.cpp (``llama-cli -m``, ``llama-server``, ollama, LM
Studio), written with gguf-py from autocomp's integer codes, exactly.

A quantized layer's signed integers ``code - zero`` (``code - 2^(b-1)`` when symmetric; 0 where
pruned) times its fp16 group scale are the simulated weights. ggml's 32-weight block types hold them
without loss when the group size is a multiple of 32 (each block takes its group's scale):

=========  ========================  ================================================
type       holds                     block (32 weights)
=========  ========================  ================================================
Q4_0       integers in [-8, 7]       fp16 scale, 16 bytes of 4-bit ``q + 8``
Q5_0       integers in [-16, 15]     fp16 scale, 4 bytes of 5th bits, 16 bytes of nibbles
Q8_0       integers in [-128, 127]   fp16 scale, 32 int8
=========  ========================  ================================================

so symmetric 2-4 bits and asymmetric 2-3 bits are Q4_0, symmetric 5 and asymmetric 4 bits Q5_0,
symmetric 6-8 and asymmetric 5-7 bits Q8_0 (:func:`ggml_type`). Asymmetric 8-bit layers, groups that
are not a multiple of 32 and layers whose input size is not a multiple of 32 cannot be held and are
refused, by name. A layer in llama.cpp's own types (methods ``ggml``, ``ggml-imatrix``:
:mod:`autocomp.compressors.ggml`) is written as the very blocks ggml's quantizer made for it. GGUF
has no sparse storage: pruned weights are stored as zeros and the sparsity is stated in
``autocomp.json``. Every other 2-D tensor is stored in the export dtype (F16, BF16 or F32),
1-D tensors (norms, biases) in F32, as llama.cpp's own converter does.

Tensor names, layouts and metadata follow llama.cpp's ``convert_hf_to_gguf.py`` for the
architectures in :data:`ARCHS` (names through gguf-py's tensor map; Llama's q/k rows permuted to
ggml's rotary layout; Gemma's norms stored as ``1 + w``). A model that autocomp loaded from a GGUF
file keeps that file's metadata and tokenizer; one loaded from a Hugging Face folder gets them from its
config and ``tokenizer.json`` (byte-level BPE tokenizers).

``load`` reads the file back with gguf-py (``dequantize``) into the Hugging Face model of the folder's
``config.json``: what the contract test compares with the scored model. llama.cpp itself computes
close to, never bit-equal with, these weights (it quantizes activations in its matmuls).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from autocomp.errors import PlanError
from autocomp.exporters.registry import ExportFormat, ExportOptions, refuse, register_format, sparse_layers

GGUF_FILE = "model.gguf"
BLOCK = 32
# signed integer range of each exact block type: (type name, lowest, highest)
BLOCK_TYPES = (("Q4_0", -8, 7), ("Q5_0", -16, 15), ("Q8_0", -128, 127))


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture is written: its gguf-py architecture, the tensor transforms
    of llama.cpp's converter, and its hyper-parameters as ``(gguf key suffix, config attribute, kind)``."""

    gguf_name: str
    hparams: tuple[tuple[str, str, str], ...]
    permute_qk: bool = False          # Llama: q/k rows to ggml's interleaved rotary layout
    norm_shift: float = 0.0           # Gemma: RMSNorm weights stored as shift + w


_COMMON = (("context_length", "max_position_embeddings", "u32"), ("embedding_length", "hidden_size", "u32"),
           ("block_count", "num_hidden_layers", "u32"), ("feed_forward_length", "intermediate_size", "u32"),
           ("attention.head_count", "num_attention_heads", "u32"),
           ("attention.head_count_kv", "num_key_value_heads", "u32"),
           ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32"), ("rope.freq_base", "rope_theta", "f32"))

ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", _COMMON + (("rope.dimension_count", "head_dim", "u32"),), permute_qk=True),
    "qwen2": Arch("qwen2", _COMMON),
    "gemma3_text": Arch("gemma3", _COMMON + (("attention.key_length", "head_dim", "u32"),
                                             ("attention.value_length", "head_dim", "u32"),
                                             ("attention.sliding_window", "sliding_window", "u32")), norm_shift=1.0),
    "gpt2": Arch("gpt2", (("context_length", "n_positions", "u32"), ("embedding_length", "n_embd", "u32"),
                          ("block_count", "n_layer", "u32"), ("feed_forward_length", "n_inner", "u32"),
                          ("attention.head_count", "n_head", "u32"),
                          ("attention.layer_norm_epsilon", "layer_norm_epsilon", "f32"))),
}
ARCHS["gemma3"] = ARCHS["gemma3_text"]


def ggml_type(bits: int, symmetric: bool) -> str | None:
    """The exact block type of a ``bits``-bit layer (None: none holds it: asymmetric 8-bit)."""
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (-((1 << bits) - 1), (1 << bits) - 1)
    return next((name for name, lo, hi in BLOCK_TYPES if lo <= low and high <= hi), None)


def _arch(model) -> Arch | None:
    return ARCHS.get(getattr(model.config, "model_type", ""))


def problems(applied) -> list[str]:
    """Why the GGUF file cannot hold ``applied``, one line per layer (empty: it can)."""
    from autocomp.compressors.ggml import GGML_METHODS
    from autocomp.compressors.rtn import resolve_group_size

    if _arch(applied.model) is None:
        return [f"the architecture {getattr(applied.model.config, 'model_type', '?')!r} has no GGUF writer here "
                f"(written: {', '.join(sorted(k for k in ARCHS if k != 'gemma3'))})"]
    out = []
    for t in applied.targets:
        plan = applied.per_layer.get(t.name)
        if plan is None or plan.quantizer is None:
            continue
        if plan.quantizer in GGML_METHODS:
            continue          # llama.cpp's own blocks, made for a row length that holds them
        group = resolve_group_size(plan.group_size, t.in_features)
        if ggml_type(plan.bits, plan.symmetric) is None:
            out.append(f"{t.name} is asymmetric 8-bit (no exact GGUF block type: use symmetric 8-bit)")
        elif t.in_features % BLOCK or group % BLOCK:
            out.append(f"{t.name} has {t.in_features} inputs in groups of {group} (GGUF blocks are 32 weights: "
                       "both must be multiples of 32)")
    return out


def check(applied, options: ExportOptions) -> None:
    refuse(problems(applied), "GGUF cannot hold this configuration exactly",
           "Compress those layers another way, or export with --format compressed-tensors or packed")


# ------------------------------------------------------------------------------------------ blocks

def pack_blocks(signed, block_scales, type_name: str):
    """The bytes (uint8 ``[out, in / 32 * block bytes]``) of ``signed`` (integers ``[out, in]``) with one
    fp16 scale per 32-weight block (``block_scales``: ``[out, in / 32]``) in ggml's ``type_name`` layout."""
    import torch

    out_f, in_f = signed.shape
    q = signed.to(torch.int32).reshape(out_f, in_f // BLOCK, BLOCK)
    d = block_scales.to(torch.float16).contiguous().view(torch.uint8).reshape(out_f, in_f // BLOCK, 2)
    if type_name == "Q8_0":
        body = [q.to(torch.int8).view(torch.uint8)]
    else:
        offset = 8 if type_name == "Q4_0" else 16
        u = q + offset
        low = u & 0xF
        body = [(low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8)]
        if type_name == "Q5_0":
            high = ((u >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int32)
            qh = high.sum(dim=-1, dtype=torch.int64)          # bit j: the fifth bit of weight j
            body.insert(0, torch.stack([(qh >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8))
    return torch.cat([d, *body], dim=-1).reshape(out_f, -1).contiguous()


def _qk_permutation(out_features: int, n_head: int):
    """Row order of llama.cpp's ``permute`` (HF rotary halves -> ggml interleaved pairs)."""
    import torch

    return torch.arange(out_features).reshape(n_head, 2, out_features // n_head // 2).transpose(1, 2).reshape(-1)


@dataclass(frozen=True)
class GGUFLayout:
    """Where each Hugging Face tensor of one model goes in its GGUF file, and in which row order."""

    arch: Arch
    names: Any                # gguf-py's TensorNameMap for the architecture and depth
    n_head: int | None
    n_kv: int | None

    @classmethod
    def of(cls, model) -> "GGUFLayout":
        import gguf

        config, arch = model.config, _arch(model)
        n_blocks = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
        n_head = getattr(config, "num_attention_heads", None)
        return cls(arch, gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_name.upper()), n_blocks),
                   n_head, getattr(config, "num_key_value_heads", n_head))

    def gguf_name(self, hf_name: str) -> str | None:
        return self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def rows(self, module: str, out_features: int):
        """The GGUF row order of ``module``'s weight (None: as in Hugging Face)."""
        if self.arch.permute_qk and module.endswith(("q_proj", "k_proj")):
            return _qk_permutation(out_features, self.n_head if module.endswith("q_proj") else self.n_kv)
        return None


# ------------------------------------------------------------------------------------------ tensors

@dataclass
class _Tensor:
    name: str
    data: Any                 # numpy array: float values, or uint8 block bytes
    raw_type: str | None      # ggml block type of uint8 bytes; None: a float array
    shape: tuple[int, int] | None = None


def _tensors(applied, options: ExportOptions, arch: Arch) -> Iterator[_Tensor]:
    import torch

    from autocomp.compressors.ggml import GGML_METHODS
    from autocomp.deploy.pack import signed_codes
    from autocomp.inputs.targets import read_weight

    model = applied.model
    layout = GGUFLayout.of(model)
    compressed = applied.compressed_weights()
    targets = {t.name: t for t in applied.targets}
    float_type = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[options.dtype]
    seen: set[int] = set()
    for hf_name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue      # a tied tensor: llama.cpp uses token_embd when output.weight is absent
        seen.add(id(value))
        name = layout.gguf_name(hf_name)
        if name is None:
            raise PlanError(f"tensor {hf_name} has no GGUF name for architecture {arch.gguf_name}; "
                            "export with --format compressed-tensors or packed")
        module, _, leaf = hf_name.rpartition(".")
        target = targets.get(module) if leaf == "weight" else None
        rows = layout.rows(module, target.out_features if target is not None else value.shape[0])
        plan = applied.per_layer.get(module) if target is not None else None
        if plan is not None and plan.quantizer in GGML_METHODS:    # ggml's own blocks, written as they are
            raw = compressed[module].quant
            blocks = raw.codes if rows is None else raw.codes[rows]
            yield _Tensor(name, blocks.numpy(), raw.ggml_type, (target.out_features, target.in_features))
            continue
        if plan is not None and plan.quantizer is not None:
            cw = compressed[module]
            signed = signed_codes(cw)
            col_group = torch.arange(0, target.in_features, BLOCK) // cw.quant.group_size
            scales = cw.quant.scales[:, col_group]
            if rows is not None:
                signed, scales = signed[rows], scales[rows]
            type_name = ggml_type(plan.bits, plan.symmetric)
            yield _Tensor(name, pack_blocks(signed, scales, type_name).numpy(), type_name,
                          (target.out_features, target.in_features))
            continue
        data = (read_weight(model.get_submodule(module)) if target is not None else value).detach().float()
        if rows is not None:
            data = data[rows]
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            data = data + arch.norm_shift
        stored = data.to(float_type).contiguous() if data.dim() > 1 else data.contiguous()
        if stored.dtype == torch.bfloat16:   # numpy has no bfloat16: its bytes, typed by ggml
            yield _Tensor(name, stored.view(torch.uint8).numpy(), "BF16")
        else:
            yield _Tensor(name, stored.numpy(), None)


# ------------------------------------------------------------------------------------------ metadata

def source_gguf(loaded) -> Path | None:
    """The GGUF file autocomp converted ``loaded`` from, if any."""
    marker = Path(loaded.folder) / "autocomp-source.json"
    if not marker.is_file():
        return None
    path = Path(json.loads(marker.read_text()).get("gguf", ""))
    return path if path.is_file() else None


_NOT_COPIED = ("general.file_type", "general.quantization_version", "GGUF.", "general.architecture")


def copy_metadata(writer, source: Path) -> None:
    """Every key of ``source`` but its file type and layout keys (llama.cpp reads them as it wrote them)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            writer.add_array(key, field.contents()) if sub != gguf.GGUFValueType.ARRAY else None
        else:
            writer.add_key_value(key, field.contents(), kind)


def _hf_metadata(writer, applied, loaded, arch: Arch) -> None:
    """Hyper-parameters from the config and the vocabulary from a byte-level BPE ``tokenizer.json``."""
    import gguf

    config = applied.model.config
    writer.add_name(Path(loaded.folder).name)
    for suffix, attr, kind in arch.hparams:
        value = getattr(config, attr, None)
        if value is None and attr == "n_inner":
            value = 4 * config.n_embd
        if value is None and attr == "head_dim":
            value = config.hidden_size // config.num_attention_heads
        if value is None:
            continue
        key = f"{arch.gguf_name}.{suffix}"
        writer.add_uint32(key, int(value)) if kind == "u32" else writer.add_float32(key, float(value))
    if arch.gguf_name == "gpt2":
        writer.add_head_count_kv(config.n_head)
    tokenizer = loaded.tokenizer
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise PlanError(f"the tokenizer of {loaded.folder} is {spec.get('model', {}).get('type')!r}, not byte-level "
                        "BPE: its GGUF vocabulary cannot be written here; export with --format compressed-tensors")
    # the token list has one entry per embedding row (llama.cpp checks it against token_embd): padding
    # rows get placeholder tokens, tokens the tokenizer added beyond the embedding are dropped
    size = applied.model.get_input_embeddings().weight.shape[0]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    for token, index in tokenizer.get_vocab().items():
        if index >= size:
            continue
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(loaded.folder, load_merges=True, n_vocab=size)
    special_vocab.add_to_gguf(writer, quiet=True)


def _write(folder: Path, applied, loaded, options: ExportOptions) -> dict[str, Any]:
    import gguf

    arch = _arch(applied.model)
    path = folder / GGUF_FILE
    writer = gguf.GGUFWriter(str(path), arch.gguf_name)
    source = source_gguf(loaded)
    if source is not None:
        copy_metadata(writer, source)
    else:
        _hf_metadata(writer, applied, loaded, arch)
    counts: dict[str, int] = {}
    for tensor in _tensors(applied, options, arch):
        kind = tensor.raw_type or str(tensor.data.dtype)
        counts[kind] = counts.get(kind, 0) + 1
        if tensor.raw_type is None:
            writer.add_tensor(tensor.name, tensor.data)
        else:
            qtype = getattr(gguf.GGMLQuantizationType, tensor.raw_type)
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=qtype)
    writer.add_file_type(gguf.LlamaFileType.GUESSED)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    applied.model.config.save_pretrained(folder)   # for `load` (and for readers that want the HF config)
    return {"storage_dtype": options.dtype, "bytes_on_disk": path.stat().st_size, "gguf_tensor_types": counts,
            "sparse_layers_stored_dense": sparse_layers(applied), "metadata_from": str(source) if source else "config.json",
            "note": "llama.cpp quantizes activations in its matmuls: its logits are close to, not equal to, the trial's"}


def read_gguf_weights(path: Path, model) -> dict[str, Any]:
    """The Hugging Face state dict of ``model``'s architecture, read back from the GGUF file at ``path``
    with gguf-py (every transform of :func:`_tensors` undone)."""
    import gguf
    import torch

    layout = GGUFLayout.of(model)
    arch = layout.arch
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    state = {}
    conv = {name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    for hf_name, value in model.state_dict().items():
        name = layout.gguf_name(hf_name)
        if name not in stored:
            continue           # a tied tensor, re-tied by the model
        t = stored[name]
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(
            [int(n) for n in reversed(t.shape)]).float()
        module = hf_name.rpartition(".")[0]
        rows = layout.rows(module, data.shape[0])
        if rows is not None:
            data = data[torch.argsort(rows)]
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            data = data - arch.norm_shift
        if module in conv and hf_name.endswith(".weight"):
            data = data.t()
        state[hf_name] = data.to(value.dtype).reshape(value.shape)
    return state


def _load(folder: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).to(torch.float32)
    model.load_state_dict(read_gguf_weights(folder / GGUF_FILE, model), strict=False)
    model.tie_weights()
    return model.eval()


register_format(ExportFormat(
    "gguf", "one model.gguf for llama.cpp (llama-cli, llama-server, ollama): codes stored exactly as Q4_0/Q5_0/Q8_0",
    _write, _load, check=check, dtypes=("float16", "bfloat16", "float32")))

