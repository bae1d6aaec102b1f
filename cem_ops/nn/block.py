"""CEMBlock: pre-norm residual block r <- r + CEMAttention(norm(r)); r <- r + CEMMLP(norm(r))."""

from __future__ import annotations

from torch import Tensor, nn

from .attention import CEMAttention
from .cache import AttentionCache
from .mlp import CEMMLP


class CEMBlock(nn.Module):
    """A Transformer block whose attention and MLP are CEM updates (cem-math.md section 4).

    ``attention_kwargs`` and ``mlp_kwargs`` go to :class:`CEMAttention` and :class:`CEMMLP`.
    The default hidden width 4 D gives the CEM MLP 8 D^2 weights, as many as a SwiGLU of width 8D/3.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int | None = None,
        *,
        norm_eps: float = 1e-6,
        attention_kwargs: dict | None = None,
        mlp_kwargs: dict | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps, **factory)
        self.attention = CEMAttention(dim, num_heads, **(attention_kwargs or {}), **factory)
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps, **factory)
        self.mlp = CEMMLP(dim, hidden if hidden is not None else 4 * dim, **(mlp_kwargs or {}), **factory)

    def new_cache(self, batch_size: int, capacity: int) -> AttentionCache:
        """The attention's cache (the MLP works position by position and keeps nothing)."""
        return self.attention.new_cache(batch_size, capacity)

    def forward(self, r: Tensor, cache: AttentionCache | None = None) -> Tensor:
        """With a cache, r is the next chunk of each row (see CEMAttention.forward)."""
        r = r + self.attention(self.attention_norm(r), cache=cache)
        return r + self.mlp(self.mlp_norm(r))
