"""Finding the compressible layers of a causal LM, generically.

A *target* is a weight matrix that a compressor may change: every ``nn.Linear`` and GPT-2
``Conv1D`` inside the decoder blocks, plus the input embedding and the LM head (tied or not). The
decoder blocks are the ``nn.ModuleList`` holding the most parameters (``model.layers`` in Llama,
Gemma, Qwen2; ``transformer.h`` in GPT-2; ``model.decoder.layers`` in OPT). Targets are named by
module path and carry their block index and a role (``q``, ``k``, ``v``, ``o``, ``qkv``, ``gate``,
``up``, ``down``, ``fc1``, ``fc2``, ``embed``, ``lm_head``, or the attribute name when unknown).

Weights are always handled as ``[out, in]`` matrices: ``Conv1D`` stores ``[in, out]`` and is
transposed on the way in and out. A tied embedding / LM head is one target (named after the
embedding), counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_ROLE_BY_ATTR = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "query": "q", "key": "k", "value": "v",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "c_fc": "up", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "w1": "gate", "w3": "up", "w2": "down",
    "fc1": "fc1", "fc2": "fc2",
}
_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention")


@dataclass(frozen=True)
class Target:
    """One compressible weight matrix."""

    name: str                  # module path, e.g. "model.layers.3.mlp.down_proj"
    block: int | None          # decoder block index; None for the embedding / LM head
    role: str
    kind: str                  # "linear" | "conv1d" | "embedding"
    out_features: int
    in_features: int
    stats_module: str | None   # module whose input activations describe this weight's inputs
    tied_with: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def in_blocks(self) -> bool:
        return self.block is not None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks: the one holding the most parameters. Raises ValueError if none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if best is None or count > best[0]:
                best = (count, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks")
    return best[1], best[2]


def _role(path_in_block: str) -> str:
    parts = path_in_block.split(".")
    attr = parts[-1]
    if attr == "c_proj" or attr == "dense":
        parent = parts[-2] if len(parts) > 1 else ""
        return "o" if parent in _ATTENTION_PARENTS else ("down" if attr == "c_proj" else "dense")
    return _ROLE_BY_ATTR.get(attr, attr)


def find_targets(model: nn.Module, embeddings: bool = True) -> list[Target]:
    """All targets of ``model``: decoder-block layers in module order, then embedding / LM head."""
    blocks_name, blocks = find_decoder_blocks(model)
    targets: list[Target] = []
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not sub or not is_weight_layer(module):
                continue
            out_f, in_f = weight_shape(module)
            name = f"{blocks_name}.{index}.{sub}"
            targets.append(Target(name, index, _role(sub), "conv1d" if _is_conv1d(module) else "linear",
                                  out_f, in_f, name))
    if embeddings:
        targets.extend(_embedding_targets(model))
    return targets


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _embedding_targets(model: nn.Module) -> list[Target]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_name, head_name = _module_name(model, emb), _module_name(model, head)
    out: list[Target] = []
    tied = emb is not None and head is not None and head.weight is emb.weight
    if emb is not None and emb_name is not None:
        vocab, dim = emb.weight.shape
        out.append(Target(emb_name, None, "embed", "embedding", vocab, dim,
                          head_name if tied else None, (head_name,) if tied else ()))
    if head is not None and head_name is not None and not tied and is_weight_layer(head):
        out_f, in_f = weight_shape(head)
        out.append(Target(head_name, None, "lm_head", "linear", out_f, in_f, head_name))
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(module) else (w.shape[0], w.shape[1])


def read_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``[out, in]`` tensor (a view; do not modify in place)."""
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an ``[out, in]`` tensor into the module's weight, in place (tied weights follow)."""
    target = module.weight.data
    with torch.no_grad():
        target.copy_(weight.t() if _is_conv1d(module) else weight)


def block_targets(targets: list[Target]) -> list[Target]:
    return [t for t in targets if t.in_blocks]


def extra_targets(targets: list[Target]) -> list[Target]:
    return [t for t in targets if not t.in_blocks]
