"""CEMAttention: the CEM attention update as a module (cem-math.md section 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from .alibi import alibi_slopes
from .preconditioner import Preconditioner

DIAG_MODES = ("none", "shared", "per_head")


class CEMAttention(nn.Module):
    """Delta = x^T - x^0 of T steps on the causal interaction energy; add it to the residual.

    Parameters: w_q, w_k (H, Dh, D) -- half the projections of standard attention, since
    V = K and W_O = W_Q^T -- plus the diagonal lambda (none, shared (D,), per head (H, D)), the
    preconditioner and the step sizes. ALiBi slopes are a buffer, not learned.

    Init: w_q, w_k ~ N(0, 1/D) so that q and k have unit-variance entries for unit-RMS input;
    lambda = 0 (the diagonal is learned from zero; its gradient does not vanish there);
    step sizes = step_size_init.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        steps: int = 1,
        diag: str = "shared",
        alibi: bool = True,
        precond: str = "none",
        precond_rank: int = 4,
        step_size_init: float = 1.0,
        learn_step_size: bool = True,
        scale: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if diag not in DIAG_MODES:
            raise ValueError(f"diag must be one of {DIAG_MODES}, got {diag!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        head_dim = head_dim if head_dim is not None else dim // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (dim={dim}, num_heads={num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim, self.steps, self.scale = dim, num_heads, head_dim, steps, scale
        std = 1.0 / math.sqrt(dim)
        self.w_q = nn.Parameter(torch.randn(num_heads, head_dim, dim, **factory) * std)
        self.w_k = nn.Parameter(torch.randn(num_heads, head_dim, dim, **factory) * std)
        diag_shape = {"none": None, "shared": (dim,), "per_head": (num_heads, dim)}[diag]
        self.diag = None if diag_shape is None else nn.Parameter(torch.zeros(diag_shape, **factory))
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads).to(device) if alibi else None)
        self.preconditioner = Preconditioner(dim, precond, precond_rank, **factory)
        step_sizes = torch.full((steps,), float(step_size_init), **factory)
        self.step_size = nn.Parameter(step_sizes, requires_grad=learn_step_size)

    def _cast(self, t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        return None if t is None else t.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        precond_diag, precond_lowrank = self.preconditioner(dtype)
        return ops.attention.attention(
            x,
            self.w_q.to(dtype),
            self.w_k.to(dtype),
            diag=self._cast(self.diag, dtype),
            alibi_slopes=self._cast(self.alibi_slopes, dtype),
            precond_diag=precond_diag,
            precond_lowrank=precond_lowrank,
            step_size=self.step_size.to(dtype),
            scale=self.scale,
        )

    def energy(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """E_i(x | context) per token, (B, N); context defaults to x (the layer input)."""
        dtype = x.dtype
        return ops.attention.attention_energy(
            x,
            x if context is None else context,
            self.w_q.to(dtype),
            self.w_k.to(dtype),
            diag=self._cast(self.diag, dtype),
            alibi_slopes=self._cast(self.alibi_slopes, dtype),
            scale=self.scale,
        )

    def extra_repr(self) -> str:
        diag = "none" if self.diag is None else ("shared" if self.diag.dim() == 1 else "per_head")
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, steps={self.steps}, "
            f"diag={diag!r}, alibi={self.alibi_slopes is not None}"
        )
