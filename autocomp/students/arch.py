"""Architecture adapters for structured pruning: where each family keeps its sizes and its weights.

Structured pruning needs to know, per model family, which config fields hold the sizes (depth, FFN
width, heads) and which modules of a decoder block hold the attention and FFN projections, so that
a student's weights can be sliced out of the teacher's. Three families are supported:

* ``llama``: Llama, Mistral, Qwen2/3, Gemma 1-3 text (``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``config.intermediate_size``, grouped-query attention, explicit
  ``head_dim``);
* ``opt``: OPT (``self_attn.{q,k,v,out}_proj``, ``fc1``/``fc2``, ``config.ffn_dim``);
* ``gpt2``: GPT-2 (fused ``attn.c_attn`` ``Conv1D``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``,
  ``config.n_inner`` with ``None`` meaning ``4 * n_embd``).

OPT and GPT-2 compute ``head_dim = hidden / heads``: their head count cannot change without changing
the hidden size, so only depth and FFN width are prunable there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autocomp.errors import PlanError
from autocomp.inputs.targets import find_decoder_blocks

LLAMA_LIKE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
SUPPORTED_TYPES = LLAMA_LIKE_TYPES + ("opt", "gpt2")


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its sizes (config keys) and projections (paths inside a block)."""

    name: str
    layers_key: str
    ffn_key: str
    heads_key: str
    kv_key: str | None          # None: no grouped-query attention (kv heads = heads)
    hidden_key: str
    o: str                      # attention output projection (its input is the concatenated heads)
    up: str                     # FFN input projection(s): rows are neurons
    down: str                   # FFN output projection: columns are neurons
    gate: str | None = None
    q: str | None = None        # separate q/k/v projections (None when fused)
    k: str | None = None
    v: str | None = None
    conv1d: bool = False        # GPT-2 Conv1D: weights stored [in, out]
    head_dim_tied: bool = False  # head_dim = hidden / heads: heads cannot be pruned

    @property
    def required(self) -> tuple[str, ...]:
        """Block module paths this adapter reads or slices: all must exist in every block."""
        return tuple(p for p in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down) if p)


LLAMA = Family("llama", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "hidden_size", o="self_attn.o_proj", up="mlp.up_proj", down="mlp.down_proj", gate="mlp.gate_proj",
               q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj")
OPT = Family("opt", "num_hidden_layers", "ffn_dim", "num_attention_heads", None, "hidden_size",
             o="self_attn.out_proj", up="fc1", down="fc2", q="self_attn.q_proj", k="self_attn.k_proj",
             v="self_attn.v_proj", head_dim_tied=True)
GPT2 = Family("gpt2", "n_layer", "n_inner", "n_head", None, "n_embd", o="attn.c_proj", up="mlp.c_fc",
              down="mlp.c_proj", conv1d=True, head_dim_tied=True)


def _unsupported(what: str) -> PlanError:
    return PlanError(f"structured pruning does not support {what}; supported model types: "
                     f"{', '.join(SUPPORTED_TYPES)}")


def family_of(config: Any) -> Family:
    """The family of a (text) causal-LM config, by model type and the size fields it must hold; PlanError otherwise."""
    model_type = getattr(config, "model_type", None)
    family = {"gpt2": GPT2, "opt": OPT}.get(model_type, LLAMA if model_type in LLAMA_LIKE_TYPES else None)
    if family is None or not all(hasattr(config, k) for k in (family.layers_key, family.ffn_key, family.heads_key)):
        raise _unsupported(f"model type {model_type!r}")
    return family


def family_of_model(model: nn.Module) -> tuple[Family, str, nn.ModuleList]:
    """The family of a loaded model, checked against its modules; also the blocks' path and list.

    The config names the family; every decoder block must then hold the family's projections with the
    expected kinds, so a model whose type string says "llama" but whose blocks differ is refused.
    """
    family = family_of(model.config)
    try:
        blocks_name, blocks = find_decoder_blocks(model)
    except ValueError as exc:
        raise _unsupported(f"{type(model).__name__} ({exc})") from None
    for block in blocks:
        for path in family.required:
            try:
                module = block.get_submodule(path)
            except AttributeError:
                raise _unsupported(f"{type(model).__name__}: its decoder blocks have no {path!r} "
                                   f"(model type {model.config.model_type!r})") from None
            is_conv = type(module).__name__ == "Conv1D"
            if not (is_conv if family.conv1d else isinstance(module, nn.Linear)):
                raise _unsupported(f"{type(model).__name__}: {path!r} is a {type(module).__name__}")
    return family, blocks_name, blocks


def teacher_dims(config: Any) -> dict[str, int]:
    """The teacher's prunable sizes: ``layers``, ``ffn``, ``heads``, ``kv_heads``, ``head_dim``, ``hidden``."""
    family = family_of(config)
    hidden = int(getattr(config, family.hidden_key))
    heads = int(getattr(config, family.heads_key))
    ffn = getattr(config, family.ffn_key)
    if ffn is None and family is GPT2:
        ffn = 4 * hidden
    kv = getattr(config, family.kv_key, None) if family.kv_key else None
    head_dim = None if family.head_dim_tied else getattr(config, "head_dim", None)
    return {"layers": int(getattr(config, family.layers_key)), "ffn": int(ffn), "heads": heads,
            "kv_heads": int(kv or heads), "head_dim": int(head_dim or hidden // heads), "hidden": hidden}


# ---------------------------------------------------------------- weight slicing


@dataclass(frozen=True)
class Keep:
    """Indices a student block keeps from its teacher block (None: keep all)."""

    ffn: torch.Tensor | None = None      # FFN neurons
    heads: torch.Tensor | None = None    # query heads
    kv: torch.Tensor | None = None       # key/value heads (groups)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a projection whose rows are ``head_dim`` blocks per head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def slicing(family: Family, keep: Keep, head_dim: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """``{module path in block: (out indices, in indices)}`` for the projections a student block slices."""
    rules: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    if keep.ffn is not None:
        for path in (family.gate, family.up):
            if path:
                rules[path] = (keep.ffn, None)
        rules[family.down] = (None, keep.ffn)
    if keep.heads is not None:
        if family.head_dim_tied:  # resolve_student refuses this; a guard against misuse
            raise PlanError(f"{family.name}: heads cannot be pruned (head_dim is tied to hidden / heads)")
        rules[family.q] = (_rows(keep.heads, head_dim), None)
        rules[family.o] = (None, _rows(keep.heads, head_dim))
        kv_rows = _rows(keep.kv, head_dim) if keep.kv is not None else None
        rules[family.k] = (kv_rows, None)
        rules[family.v] = (kv_rows, None)
    return rules


def slice_param(tensor: torch.Tensor, param: str, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None,
                conv1d: bool) -> torch.Tensor:
    """Slice one projection parameter (``weight`` [out, in], or [in, out] for Conv1D; ``bias`` [out])."""
    out_dim, in_dim = (1, 0) if conv1d else (0, 1)
    if param == "bias":
        return tensor.index_select(0, out_idx.to(tensor.device)) if out_idx is not None else tensor
    if out_idx is not None:
        tensor = tensor.index_select(out_dim, out_idx.to(tensor.device))
    if in_idx is not None:
        tensor = tensor.index_select(in_dim, in_idx.to(tensor.device))
    return tensor
