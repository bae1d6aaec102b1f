"""Learned preconditioner P = diag(p) + U U^T of a CEM update, p = softplus(rho) > 0."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PRECOND_MODES = ("none", "diag", "lowrank", "diag_lowrank")


class Preconditioner(nn.Module):
    """Holds the optional parts of P; ``forward(dtype)`` returns (p or None, U or None).

    p starts at 1 (softplus(rho) = 1) so that P starts at the identity plus U U^T; U starts small
    but not at zero, where its gradient would vanish (dU is linear in U).
    """

    def __init__(self, dim: int, mode: str = "none", rank: int = 4, lowrank_init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        if mode not in PRECOND_MODES:
            raise ValueError(f"precond must be one of {PRECOND_MODES}, got {mode!r}")
        if "lowrank" in mode and rank < 1:
            raise ValueError(f"precond_rank must be >= 1 for precond={mode!r}, got {rank}")
        self.mode = mode
        factory = {"device": device, "dtype": dtype}
        self.rho = nn.Parameter(torch.full((dim,), math.log(math.e - 1), **factory)) if "diag" in mode else None
        self.lowrank = (
            nn.Parameter(torch.randn(dim, rank, **factory) * lowrank_init_std) if "lowrank" in mode else None
        )

    def forward(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        p = None if self.rho is None else _positive(nn.functional.softplus(self.rho), dtype)
        u = None if self.lowrank is None else self.lowrank.to(dtype)
        return p, u

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _positive(p: Tensor, dtype: torch.dtype) -> Tensor:
    """p in ``dtype``, at least its smallest normal number: softplus of a very negative rho
    underflows to 0 (float16 below rho ~ -17), and P must stay positive definite. The gradient
    passes through unchanged, so rho can still move back up."""
    floor = max(torch.finfo(dtype).tiny, torch.finfo(p.dtype).tiny)
    floored = p + (p.clamp_min(floor) - p).detach()
    return floored.to(dtype)
