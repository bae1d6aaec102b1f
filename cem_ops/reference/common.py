"""Pieces shared by the attention and MLP references: precision rules and the preconditioner."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation, softmax statistics and log-sum-exp run in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def precondition(g: Tensor, precond_diag: Tensor | None, precond_lowrank: Tensor | None) -> Tensor:
    """P g = p * g + U (U^T g) over the last dimension; p = 1 and U = 0 when absent."""
    out = g if precond_diag is None else g * precond_diag
    if precond_lowrank is not None:
        out = out + (g @ precond_lowrank) @ precond_lowrank.transpose(0, 1)
    return out


def precondition_backward(
    grad_pg: Tensor, g: Tensor, precond_diag: Tensor | None, precond_lowrank: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of P g with respect to g, p and U, given d(P g) and g (both (..., D)).

    P is symmetric, so d g = P d(Pg).  d p = sum over tokens of d(Pg) * g.
    d U = sum over tokens of d(Pg) (U^T g)^T + g (U^T d(Pg))^T.
    """
    grad_g = precondition(grad_pg, precond_diag, precond_lowrank)
    flat_grad = grad_pg.reshape(-1, grad_pg.shape[-1])
    flat_g = g.reshape(-1, g.shape[-1])
    grad_diag = None if precond_diag is None else (flat_grad * flat_g).sum(0)
    grad_lowrank = None
    if precond_lowrank is not None:
        grad_lowrank = flat_grad.transpose(0, 1) @ (flat_g @ precond_lowrank) + flat_g.transpose(0, 1) @ (
            flat_grad @ precond_lowrank
        )
    return grad_g, grad_diag, grad_lowrank


class EpilogueGrads:
    """Gradients of the update x^{t+1} = x^t + eta_t P G^t, accumulated over the reverse steps:
    d eta, dp and dU here, dG returned to the caller's core backward."""

    def __init__(self, step_size: Tensor, precond_diag: Tensor | None, precond_lowrank: Tensor | None):
        self.eta, self.p, self.u = step_size, precond_diag, precond_lowrank
        self.step_size = torch.zeros_like(step_size)
        self.precond_diag = None if precond_diag is None else torch.zeros_like(precond_diag)
        self.precond_lowrank = None if precond_lowrank is None else torch.zeros_like(precond_lowrank)

    def backward(self, t: int, grad_iterate: Tensor, neg_grad: Tensor) -> Tensor:
        """dG^t given a = d x^{t+1} and G^t."""
        self.step_size[t] = (grad_iterate * precondition(neg_grad, self.p, self.u)).sum()
        grad_g, grad_p, grad_u = precondition_backward(self.eta[t] * grad_iterate, neg_grad, self.p, self.u)
        if grad_p is not None:
            self.precond_diag += grad_p
        if grad_u is not None:
            self.precond_lowrank += grad_u
        return grad_g
