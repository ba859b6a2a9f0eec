"""Shared pieces of the optimal-brain-surgeon solvers (GPTQ, SparseGPT).

Both process the columns of ``W`` (``[out, in]``) left to right; after fixing column ``i`` (quantized
or pruned to ``q``) the error ``(w_i - q_i) / [H^-1]_ii`` is spread over the columns not yet fixed
through row ``i`` of the upper Cholesky factor of ``H^-1``, where ``H = 2 X X^T / n`` is the layer's
input Hessian. Columns are handled in blocks with lazy batch updates (GPTQ, Sec. 3, "Step 2").
"""

from __future__ import annotations

import torch

from autocomp.errors import PlanError


def inverse_hessian_factor(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(W, U)``: a float32 copy of the weight with dead inputs zeroed, and the upper Cholesky
    factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``. Dead inputs (``H_jj == 0``) get ``H_jj = 1``.
    Raises PlanError when the damped Hessian is still not positive definite."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    if H.shape != (W.shape[1], W.shape[1]):
        raise PlanError(f"Hessian is {tuple(H.shape)} but the layer has {W.shape[1]} inputs")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise PlanError(f"the damped Hessian is not positive definite (damp={damp}); raise 'damp' in the method options") from None
    return W, U
