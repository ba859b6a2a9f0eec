"""Tiny random causal LMs and a small BPE tokenizer, built from configs in seconds (for tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from autocomp.inputs.data import load_named_split

VOCAB = 384


def train_tokenizer(out_dir: Path):
    """A byte-level BPE with BOS/EOS trained on a slice of WikiText-2 validation; saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = load_named_split("wikitext2", "validation").text[:200_000]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, vocab: int):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                sliding_window=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          bos_token_id=1, eos_token_id=2)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    raise ValueError(arch)


ARCHS = ("llama", "gemma3", "gpt2", "opt", "qwen2")


def build_tiny_model(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model plus the tokenizer under ``out_dir``; returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def state_copy(model) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict (to compare before and after)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cycle_plan(targets, menu, outside) -> dict:
    """A per-layer plan: the decoder-block targets take ``menu``'s plans in turn, the others
    (embedding, LM head) ``outside(target)`` (left out where that is None)."""
    plan = {t.name: menu[i % len(menu)] for i, t in enumerate(t for t in targets if t.in_blocks)}
    for t in targets:
        if not t.in_blocks and outside(t) is not None:
            plan[t.name] = outside(t)
    return plan


def copy_with_nan_weight(src: Path, dst: Path, part: str = "down_proj") -> str:
    """Copy the model folder ``src`` to ``dst`` with one NaN in the first weight whose name holds
    ``part``; returns that weight's name."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = next(k for k in tensors if part in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return name
