"""Gradient-weighted layer factors: the predicted KL to the dense model of a layer's weight change.

The KL from the dense model to a perturbed one is, to second order, ``1/2 dθ^T F dθ`` with ``F`` the
Fisher information of the dense model's own predictive distribution (the first-order term vanishes:
KL is minimal at the dense weights). For a linear layer ``y_t = W x_t`` and the diagonal of the
output factor, the change in summed log-likelihood over tokens ``t`` gives

    KL  ~=  1/(2T) * sum_t sum_i g_{t,i}^2 (dW_i x_t)^2          g_t = dlogp / dy_t

which needs one ``[in, in]`` matrix per output channel. Factorising the squared gradients as
``g_{t,i}^2 ~= s_t b_i`` (``s_t = sum_i g_{t,i}^2``, the token's gradient energy; ``b_i`` the channel's
share) leaves one matrix per layer:

    KL  ~=  1/2 * sum_i G_i * dW_i Hg dW_i^T,     G_i = mean_t g_{t,i}^2,   Hg = sum_t s_t x_t x_t^T / sum_t s_t

``Hg`` is the input second moment *weighted by how much each token's output matters*. The plain
K-FAC factorisation (Martens & Grosse, 2015), ``mean_t x x^T`` with ``G``, assumes that gradients and
inputs are independent across tokens; on ``gemma3-270m`` that over-predicts the harm of the late MLP
down-projections 45 to 90 times, because their inputs are dominated by a few tokens with massive
activations whose outputs barely move the prediction. Weighting the tokens is the idea of
GuidedQuant (Kim et al., 2025), which weights GPTQ's layer objective by end-loss gradients.

The gradients use labels *sampled* from the dense model (the true Fisher, whose expectation is the
KL's Hessian; the empirical Fisher with real next tokens is biased away from convergence): one
backward pass per calibration window, no weight gradients (parameters stay frozen; the graph starts at
the input embeddings). Layers with more than ``full_limit`` inputs keep only the diagonal of ``Hg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from autocomp.inputs.targets import Target


@dataclass
class FisherFactors:
    """Per target: the output factor ``G [out]`` and the weighted input moment ``Hg [in, in]`` (or its
    diagonal ``[in]``)."""

    output: Mapping[str, torch.Tensor]
    inputs: Mapping[str, torch.Tensor]

    def covers(self, name: str) -> bool:
        return name in self.output and name in self.inputs

    def predicted_kl(self, name: str, delta: torch.Tensor) -> float:
        """Second-order mean KL per token to the dense model when target ``name`` changes by ``delta``
        (``[out, in]``), every other layer dense."""
        moment = self.inputs[name].to(torch.float32)
        delta = delta.to(torch.float32)
        per_row = ((delta @ moment) * delta).sum(dim=1) if moment.dim() == 2 else (delta.pow(2) * moment).sum(dim=1)
        return 0.5 * float((self.output[name].to(torch.float32) * per_row).sum())


class _LayerAccumulator:
    def __init__(self, out_features: int, in_features: int, full: bool) -> None:
        self.g2 = torch.zeros(out_features, dtype=torch.float64)
        self.moment = torch.zeros((in_features, in_features) if full else in_features, dtype=torch.float64)
        self.energy = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        g2 = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64).pow(2)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        s = g2.sum(dim=1)                                  # [T] gradient energy per token
        self.g2 += g2.sum(dim=0)
        weighted = x2 * s.to(torch.float32).unsqueeze(1)
        if self.moment.dim() == 2:
            self.moment += (weighted.t() @ x2).double()
        else:
            self.moment += (weighted * x2).sum(dim=0).double()
        self.energy += float(s.sum())
        self.tokens += x2.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        moment = self.moment / max(self.energy, 1e-300)
        if moment.dim() == 2:  # exactly symmetric (the float32 products are not)
            moment = (moment + moment.t()) / 2
        return self.g2 / max(self.tokens, 1), moment.to(torch.float32)


def gradient_factors(model: nn.Module, targets: list[Target], windows: torch.Tensor, seed: int = 0,
                     chunk: int = 128, full_limit: int = 4096) -> FisherFactors:
    """:class:`FisherFactors` of every non-embedding target from ``windows`` (``[n, seq]`` token ids;
    every position counts as one token). One window is in flight at a time (its activations, its
    ``[seq, vocab]`` logits and their gradient)."""
    layers = [t for t in targets if t.kind != "embedding"]
    accs = {t.name: _LayerAccumulator(t.out_features, t.in_features, t.in_features <= full_limit) for t in layers}
    generator = torch.Generator().manual_seed(seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()

    def capture(name):
        def hook(_module, inputs, output):
            if output.requires_grad:
                x = inputs[0].detach()
                output.register_hook(lambda grad: accs[name].add(x, grad))  # add returns None: grad unchanged
        return hook

    def start_graph(_module, _inputs, output):
        return output.detach().requires_grad_(True)

    handles = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
        handles += [model.get_submodule(t.name).register_forward_hook(capture(t.name)) for t in layers]
        for row in windows:
            with torch.enable_grad():
                logits = model(row.unsqueeze(0), use_cache=False).logits[0]
                loss = logits.new_zeros((), dtype=torch.float32)
                for begin in range(0, logits.shape[0], chunk):  # float32 softmax one chunk at a time
                    z = logits[begin:begin + chunk].float()
                    with torch.no_grad():
                        labels = torch.multinomial(torch.softmax(z, -1), 1, generator=generator)[:, 0]
                    loss = loss + nn.functional.cross_entropy(z, labels, reduction="sum")
                loss.backward()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    output, inputs = {}, {}
    for name, acc in accs.items():
        output[name], inputs[name] = acc.result()
    return FisherFactors(output, inputs)
