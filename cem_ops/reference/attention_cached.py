"""cem::attention_cached by the definition: the rows of a chunk of new positions, each attending to
its row's cached context and to the chunk up to itself (cem-math.md section 2 with a query offset).

Each batch row is computed on its own, over exactly its own context: nothing is padded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import resolve_scale
from .common import accumulation_dtype, cast, precondition


def attention_cached(
    x: Tensor, w_q: Tensor, w_k: Tensor, cache_keys: Tensor, cache_context: Tensor | None, cache_lengths: Tensor,
    diag: Tensor | None, alibi_slopes: Tensor | None, precond_diag: Tensor | None, precond_lowrank: Tensor | None,
    step_size: Tensor, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(Delta of the chunk (B, C, D), the chunk's keys (B, C, H, Dh)), both in x's dtype."""
    acc = accumulation_dtype(x.dtype)
    batch, chunk, dim = x.shape
    heads, head_dim, _ = w_q.shape
    beta = resolve_scale(scale, head_dim)
    wq, wk = w_q.to(acc), w_k.to(acc)
    lam, slopes = cast(diag, acc), cast(alibi_slopes, acc)
    p, u, eta = cast(precond_diag, acc), cast(precond_lowrank, acc), step_size.to(acc)
    x0 = x.to(acc)
    chunk_keys = torch.einsum("bcd,hed->bche", x0, wk)
    lengths = [int(n) for n in cache_lengths.tolist()]
    out = torch.empty(batch, chunk, dim, dtype=acc, device=x.device)
    for b, cached in enumerate(lengths):
        keys = torch.cat([cache_keys[b, :cached].to(acc), chunk_keys[b]])  # (L, H, Dh)
        context = torch.cat([cache_context[b, :cached].to(acc), x0[b]]) if lam is not None else None
        rows = torch.arange(cached, cached + chunk, device=x.device)
        distance = (rows[:, None] - torch.arange(cached + chunk, device=x.device)[None, :]).to(acc)
        bias = torch.zeros(heads, chunk, cached + chunk, dtype=acc, device=x.device)
        if slopes is not None:
            bias = -slopes[:, None, None] * distance
        bias = bias.masked_fill(distance < 0, float("-inf"))
        xt = x0[b]
        for t in range(eta.shape[0]):
            s = torch.einsum("ched,lhe->hcl", torch.einsum("cd,hed->ched", xt, wq), keys)
            if lam is not None:
                xl = xt * lam if lam.dim() == 1 else xt[None] * lam[:, None]  # (C, D) or (H, C, D)
                s = s + (xl @ context.T if lam.dim() == 1 else torch.einsum("hcd,ld->hcl", xl, context))
            probs = torch.softmax(beta * s + bias, dim=-1)  # (H, C, L)
            g = torch.einsum("hcl,lhe,hed->cd", probs, keys, wq)
            if lam is not None:
                lam_h = lam.expand(heads, dim) if lam.dim() == 1 else lam
                g = g + torch.einsum("hcl,ld,hd->cd", probs, context, lam_h)
            xt = xt + eta[t] * precondition(g, p, u)
        out[b] = xt - x0[b]
    return out.to(x.dtype), chunk_keys.to(x.dtype)
