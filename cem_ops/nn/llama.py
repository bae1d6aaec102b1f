"""Llama-style baselines: untied Q, K, V, O attention on SDPA (RoPE, ALiBi or no positions) and
the SwiGLU MLP. They are the yardstick the CEM layers are compared with."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .alibi import alibi_slopes
from .cache import KVCache

POSITIONS = ("rope", "alibi", "none")


def rotary_embedding(x: Tensor, base: float, positions: Tensor | None = None) -> Tensor:
    """RoPE on (B, H, N, Dh) with the rotate-half convention; Dh must be even. ``positions``:
    (N,) or (B, N) absolute positions (default 0..N-1)."""
    n, head_dim = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    if positions is None:
        positions = torch.arange(n, device=x.device)
    angles = positions.to(x.device, torch.float32)[..., None] * inv_freq  # (N or B N, Dh/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # per row: broadcast over heads
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], -1) * sin


class LlamaAttention(nn.Module):
    """Causal multi-head attention with separate Q, K, V, O projections (4 D H Dh weights)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        position: str = "rope",
        rope_base: float = 10000.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        head_dim = head_dim if head_dim is not None else dim // num_heads
        if position == "rope" and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.position, self.rope_base = num_heads, head_dim, position, rope_base
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(dim, num_heads * head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(dim, num_heads * head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False, **factory)
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads).to(device) if position == "alibi" else None)

    def _heads(self, t: Tensor) -> Tensor:
        batch, n, _ = t.shape
        return t.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """Empty key and value storage (2 H Dh per token) in the module's dtype and device."""
        weight = self.k_proj.weight
        return KVCache(batch_size, capacity, self.num_heads, self.head_dim, dtype=weight.dtype, device=weight.device)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Attention over x (B, N, D); with a cache, x is the next chunk of each row, attending to
        the cached positions too, and its keys and values are appended."""
        if cache is not None:
            return self._forward_cached(x, cache)
        batch, n, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.position == "rope":
            q, k = rotary_embedding(q, self.rope_base), rotary_embedding(k, self.rope_base)
        if self.position == "alibi":
            pos = torch.arange(n, device=x.device)
            distance = (pos[:, None] - pos[None, :]).to(x.dtype)
            bias = -self.alibi_slopes.to(x.dtype)[:, None, None] * distance
            bias = bias.masked_fill(distance < 0, float("-inf"))
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, -1))

    @torch.no_grad()  # a cache serves inference: no autograd graph through it
    def _forward_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from new_cache(), got {type(cache).__name__}")
        if cache.keys.shape[2:] != (self.num_heads, self.head_dim):
            raise ValueError("the cache was not made by this module's new_cache() (its shapes differ)")
        cache.check_chunk("LlamaAttention", x, self.q_proj.in_features)
        batch, n, _ = x.shape
        if n == 0:
            return x.new_zeros(x.shape)
        positions = cache.device_lengths()[:, None] + torch.arange(n, device=x.device)  # (B, C) absolute positions
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.position == "rope":
            q, k = rotary_embedding(q, self.rope_base, positions), rotary_embedding(k, self.rope_base, positions)
        cache.append(k.transpose(1, 2), v.transpose(1, 2))
        context = int(cache.lengths.max())  # keys past a row's own length are masked out
        keys = cache.keys[:, :context].transpose(1, 2)
        values = cache.values[:, :context].transpose(1, 2)
        distance = (positions[:, None, :, None] - torch.arange(context, device=x.device)).to(x.dtype)
        bias = torch.zeros_like(distance) if self.alibi_slopes is None else (
            -self.alibi_slopes.to(x.dtype)[None, :, None, None] * distance)
        bias = bias.masked_fill(distance < 0, float("-inf"))
        out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, -1))


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x): 3 D M weights."""

    def __init__(self, dim: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(dim, hidden, bias=False, **factory)
        self.up = nn.Linear(dim, hidden, bias=False, **factory)
        self.down = nn.Linear(hidden, dim, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """Pre-norm Llama block; the default hidden width 8D/3 (rounded up to a multiple of 8)."""

    def __init__(self, dim: int, num_heads: int, hidden: int | None = None, *, norm_eps: float = 1e-6,
                 position: str = "rope", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = hidden if hidden is not None else 8 * ((8 * dim // 3 + 7) // 8)
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps, **factory)
        self.attention = LlamaAttention(dim, num_heads, position=position, **factory)
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps, **factory)
        self.mlp = SwiGLU(dim, hidden, **factory)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return self.attention.new_cache(batch_size, capacity)

    def forward(self, r: Tensor, cache: KVCache | None = None) -> Tensor:
        r = r + self.attention(self.attention_norm(r), cache=cache)
        return r + self.mlp(self.mlp_norm(r))
