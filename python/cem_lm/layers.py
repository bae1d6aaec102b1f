"""The attention and MLP sublayers of each kind, built from cem_ops.nn, and the pre-norm
residual wrapper that can apply a sublayer more than once (the naive-reuse control)."""

from __future__ import annotations

from torch import Tensor, nn

from cem_ops.nn import CEMMLP, CEMAttention, LlamaAttention, SwiGLU

from .config import ModelConfig


def make_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "llama":
        return LlamaAttention(cfg.dim, cfg.heads, position=cfg.resolved_position)
    return CEMAttention(
        cfg.dim,
        cfg.heads,
        steps=cfg.attn_steps,
        diag=cfg.diag,
        alibi=cfg.resolved_position == "alibi",
        precond=cfg.precond,
        precond_rank=cfg.precond_rank,
        step_size_init=cfg.step_size_init,
    )


def make_mlp(cfg: ModelConfig) -> nn.Module:
    if cfg.mlp == "llama":
        return SwiGLU(cfg.dim, cfg.swiglu_hidden)
    return CEMMLP(cfg.dim, cfg.mlp_hidden, steps=cfg.mlp_steps, precond=cfg.precond, precond_rank=cfg.precond_rank,
                  step_size_init=cfg.step_size_init)


class PreNormResidual(nn.Module):
    """r <- r + layer(norm(r)), ``times`` times with the same weights (each pass re-reads r)."""

    def __init__(self, dim: int, layer: nn.Module, norm_eps: float, times: int = 1):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.layer = layer
        self.times = times

    def forward(self, r: Tensor, caches: list | None = None) -> Tensor:
        """``caches``: one per pass (each pass sees its own context), for an attention layer."""
        for i in range(self.times):
            out = self.layer(self.norm(r)) if caches is None else self.layer(self.norm(r), cache=caches[i])
            r = r + out.to(r.dtype)
        return r

    def new_caches(self, batch_size: int, capacity: int) -> list:
        return [self.layer.new_cache(batch_size, capacity) for _ in range(self.times)]


class Block(nn.Module):
    """Pre-norm Transformer block with any attention/MLP kind; ``reuse`` picks what repeats."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        times = {kind: cfg.reuse_times if cfg.reuse == kind else 1 for kind in ("attention", "mlp", "block")}
        self.attention = PreNormResidual(cfg.dim, make_attention(cfg), cfg.norm_eps, times["attention"])
        self.mlp = PreNormResidual(cfg.dim, make_mlp(cfg), cfg.norm_eps, times["mlp"])
        self.times = times["block"]

    def forward(self, r: Tensor, caches: list | None = None) -> Tensor:
        """``caches`` from new_caches(): the attention's, one list per pass of the block."""
        for i in range(self.times):
            r = self.mlp(self.attention(r, None if caches is None else caches[i]))
        return r

    def new_caches(self, batch_size: int, capacity: int) -> list:
        return [self.attention.new_caches(batch_size, capacity) for _ in range(self.times)]
