"""CEMMLP: the CEM element-wise-energy update as a module (cem-math.md section 3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..reference.mlp import ACTIVATIONS
from .preconditioner import Preconditioner


class CEMMLP(nn.Module):
    """Delta = x^T - x^0 of T steps of G(x) = w^T (phi(w x) * (v c)); add it to the residual.

    Parameters: w (M, D) tied gate/readout, v (M, D) multiplicative projection of the condition,
    the preconditioner and the step sizes: 2 M D projection weights against 3 M D for SwiGLU.

    Init: w ~ N(0, 1/D) (unit-variance pre-activations for unit-RMS input) and v ~ N(0, 1/M), so
    that the readout w^T(...) of M terms keeps O(1) variance whatever the width M.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation: str = "silu",
        steps: int = 1,
        precond: str = "none",
        precond_rank: int = 4,
        step_size_init: float = 1.0,
        learn_step_size: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden, self.steps, self.activation = dim, hidden, steps, activation
        self.w = nn.Parameter(torch.randn(hidden, dim, **factory) / math.sqrt(dim))
        self.v = nn.Parameter(torch.randn(hidden, dim, **factory) / math.sqrt(hidden))
        self.preconditioner = Preconditioner(dim, precond, precond_rank, **factory)
        self.step_size = nn.Parameter(torch.full((steps,), float(step_size_init), **factory), requires_grad=learn_step_size)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        precond_diag, precond_lowrank = self.preconditioner(dtype)
        return ops.mlp.mlp(
            x,
            self.w.to(dtype),
            self.v.to(dtype),
            precond_diag=precond_diag,
            precond_lowrank=precond_lowrank,
            step_size=self.step_size.to(dtype),
            activation=self.activation,
        )

    def energy(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """E(x | context) per token, (B, N); context defaults to x."""
        dtype = x.dtype
        return ops.mlp.mlp_energy(
            x, x if context is None else context, self.w.to(dtype), self.v.to(dtype), activation=self.activation
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, steps={self.steps}, activation={self.activation!r}"
