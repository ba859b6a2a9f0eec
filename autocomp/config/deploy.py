"""Deployment targets: what a search space's ``deploy_target`` restricts, so that every configuration
a search proposes can be exported to, and served by, that engine, at exactly the size the search
accounted for it.

==========  ============================  =====================================================
target      exported as                   choices allowed
==========  ============================  =====================================================
vllm        compressed-tensors, checked   symmetric 2, 4 or 8 bits (other widths are unpacked
            with ``--target vllm``        differently by vLLM's compressed-tensors 0.17;
                                          asymmetric layers are stored one bit wider); group
                                          sizes that divide every searched layer's inputs; no
                                          quantized embedding; q/k/v and gate/up take one choice
                                          per block (vLLM runs them as one layer); no GPT-2
                                          Conv1D layers; no sparsity (both formats store
                                          pruned weights as zeros)
llamacpp    gguf                          symmetric 4, 5 or 8 bits in groups of 32: exactly
                                          ggml's Q4_0, Q5_0 and Q8_0 blocks (other widths and
                                          groups would be stored in a wider block than the
                                          search accounted); quantized layers need input sizes
                                          that are multiples of 32. Or llama.cpp's own types
                                          (methods ggml, ggml-imatrix: 2, 3, 4, 5, 6 or 8 bits,
                                          Q2_K ... Q6_K and Q8_0), never mixed with the others
torch       packed (autocomp's kernels)   anything
==========  ============================  =====================================================

A space without ``deploy_target`` is unrestricted and exports as compressed-tensors by default
(llama.cpp's own types, methods ``ggml``, need ``deploy_target: llamacpp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

VLLM_BITS = (2, 4, 8)
LLAMACPP_BITS = (4, 5, 8)     # Q4_0, Q5_0, Q8_0 with one fp16 scale per 32 weights


@dataclass(frozen=True)
class DeployTarget:
    name: str
    format: str                              # the export format a study with this target writes by default
    export_target: str | None = None         # the exporter's --target check
    fused: tuple[tuple[str, ...], ...] = ()  # roles the engine runs as one layer: one choice per block

    def space_problems(self, space: Any) -> list[str]:
        """Choices of ``space`` (a :class:`~autocomp.config.space.SearchSpace`, which imports this module)
        this target cannot hold at their accounted size (each says what to change)."""
        from autocomp.compressors.ggml import GGML_METHODS

        ggml = [m for m in space.quant_methods if m in GGML_METHODS]
        quantized = [b for b in space.bits if b < 16]
        if ggml and self.name != "llamacpp":
            return [f"methods {ggml} (llama.cpp's own types: only deploy_target llamacpp exports them)"]
        if not quantized or self.name == "torch":
            return []
        out = []
        if ggml:     # llama.cpp's types (every allowed width has one): their blocks hold no pruned weights
            if len(ggml) != len(space.quant_methods):
                out.append(f"methods {list(space.quant_methods)} mix llama.cpp's own types with autocomp's "
                           "(search one kind per space)")
            if any(level != 0.0 for level in space.levels):
                out.append("sparsity levels above 0 (llama.cpp's blocks hold no pruned weights; set "
                           "sparsity.levels to [0.0])")
            return out
        allowed = VLLM_BITS if self.name == "vllm" else LLAMACPP_BITS
        wrong = [b for b in quantized if b not in allowed]
        if wrong:
            out.append(f"bits {wrong} (use {', '.join(map(str, allowed))} or 16)")
        if False in space.symmetric:
            out.append("asymmetric layers (set quantization.symmetric to [true])")
        if any(level != 0.0 for level in space.levels):
            out.append("sparsity levels above 0 (pruned weights are stored as zeros: no bytes saved; set "
                       "sparsity.levels to [0.0])")
        if self.name == "vllm" and space.embeddings:
            out.append("a quantized embedding, which vLLM does not load from compressed-tensors (set "
                       "targets.embeddings to false)")
        if self.name == "llamacpp" and list(space.group_sizes) != [32]:
            out.append(f"group sizes {list(space.group_sizes)} (GGUF's exact blocks hold groups of 32: set "
                       "quantization.group_size to [32])")
        return out

    def target_problems(self, space: Any, targets: Sequence[Any]) -> list[str]:
        """Layers (:class:`~autocomp.inputs.targets.Target`) this target cannot hold under ``space``."""
        if not any(b < 16 for b in space.bits):
            return []
        if self.name == "vllm":
            conv = [f"{t.name} is a GPT-2 Conv1D layer, which vLLM's compressed-tensors loader does not quantize"
                    for t in targets if t.kind == "conv1d"]
            groups = [f"{t.name} has {t.in_features} inputs, which group size {g} does not divide" for t in targets
                      for g in space.group_sizes if g != -1 and g < t.in_features and t.in_features % g]
            return (conv + groups)[:3]
        if self.name == "llamacpp":
            return [f"{t.name} has {t.in_features} inputs, not a multiple of 32 (exclude it in targets.exclude)"
                    for t in targets if t.in_features % 32][:3]
        return []

    def fused_key(self, role: str) -> str | None:
        """The shared group name of ``role`` (``q+k+v``) when the engine fuses it, else None."""
        return next(("+".join(group) for group in self.fused if role in group), None)


DEPLOY_TARGETS: dict[str, DeployTarget] = {
    "vllm": DeployTarget("vllm", "compressed-tensors", "vllm", fused=(("q", "k", "v"), ("gate", "up"))),
    "llamacpp": DeployTarget("llamacpp", "gguf"),
    "torch": DeployTarget("torch", "packed"),
}
