"""CEMAttention: the CEM attention update as a module (cem-math.md section 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import attention_cached as _cached_op
from .alibi import alibi_slopes
from .cache import AttentionCache
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

    def new_cache(self, batch_size: int, capacity: int) -> AttentionCache:
        """Empty storage for ``capacity`` positions of ``batch_size`` rows, in the module's dtype and
        on its device: keys (H Dh per token), and the context (D more) when there is a diagonal."""
        return AttentionCache(batch_size, capacity, self.num_heads, self.head_dim, self.dim, self.diag is not None,
                              dtype=self.w_q.dtype, device=self.w_q.device)

    def forward(self, x: Tensor, cache: AttentionCache | None = None) -> Tensor:
        """Delta for x (B, N, D). With a cache, x is the next chunk of each row: its rows attend to
        the cached positions as well, the chunk is appended, and the result equals those rows of
        the full-sequence forward (inference only: no backward through a cache)."""
        if cache is not None:
            return self._forward_cached(x, cache)
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

    def _forward_cached(self, x: Tensor, cache: AttentionCache) -> Tensor:
        if not isinstance(cache, AttentionCache):
            raise TypeError(f"cache must be an AttentionCache from new_cache(), got {type(cache).__name__}")
        if (cache.keys.shape[2:] != (self.num_heads, self.head_dim)) or ((cache.context is None) != (self.diag is None)):
            raise ValueError("the cache was not made by this module's new_cache() (its shapes differ)")
        cache.check_chunk("CEMAttention", x, self.dim)
        if x.shape[1] > 1 and int(cache.lengths.max()) == 0:
            # A first prefill attends to itself alone: the whole-sequence op (tensor-core kernels on
            # a GPU) computes exactly that, and the keys are one projection.
            keys = torch.einsum("bnd,hed->bnhe", x, self.w_k.to(x.dtype))
            delta = self.forward(x)
            cache.append(keys, x if cache.context is not None else None)
            return delta
        dtype = x.dtype
        precond_diag, precond_lowrank = self.preconditioner(dtype)
        stored = cache.in_use(x.shape[1])
        delta, keys = _cached_op.attention_cached(
            x, self.w_q.to(dtype), self.w_k.to(dtype), cache_keys=stored["keys"], cache_context=stored["context"],
            cache_lengths=cache.device_lengths(), diag=self._cast(self.diag, dtype),
            alibi_slopes=self._cast(self.alibi_slopes, dtype), precond_diag=precond_diag,
            precond_lowrank=precond_lowrank, step_size=self.step_size.to(dtype), scale=self.scale,
        )
        cache.append(keys, x if cache.context is not None else None)
        return delta

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
