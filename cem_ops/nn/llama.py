"""Llama-style baselines: untied Q, K, V, O attention on SDPA (RoPE, ALiBi or no positions) and
the SwiGLU MLP. They are the yardstick the CEM layers are compared with."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .alibi import alibi_slopes

POSITIONS = ("rope", "alibi", "none")


def rotary_embedding(x: Tensor, base: float) -> Tensor:
    """RoPE on (B, H, N, Dh) with the rotate-half convention; Dh must be even."""
    n, head_dim = x.shape[-2], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
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

    def forward(self, x: Tensor) -> Tensor:
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

    def forward(self, r: Tensor) -> Tensor:
        r = r + self.attention(self.attention_norm(r))
        return r + self.mlp(self.mlp_norm(r))
