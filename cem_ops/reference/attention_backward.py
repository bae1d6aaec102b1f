"""Explicit backward pass of CEM attention, written from the hand-derived formulas in
docs/backward.md (no autograd), in the order a fused kernel runs it:

    keys K = W_K c once; gradient a of the current iterate starts at dY
    for t = T-1 .. 0:                                     (reverse over steps)
        G^t = W_Q^T o^t + diag_values^t                   (from the saved head outputs)
        d eta_t += <a, P G^t>;  dG = P (eta_t a);  dp, dU  (preconditioner epilogue)
        recompute q^t = W_Q x^t, P^t = exp(s - lse^t) tile by tile (flash-attention style)
        pass 1 (only with a diagonal): Delta_i += sum_j p_ij (y_i . c_j)
        pass 2: dS = P (dP - Delta); accumulate dq, dK, dc, d lambda, the direct dx
        a += W_Q^T dq + direct diagonal term
    dW_K = dK^T c;  dc += W_K^T dK;  dx = a + dc - dY

With a shared diagonal only the head sums Pbar = sum_k P^k and dSbar = sum_k dS^k meet the
D-wide terms, so the D-wide work is done once for all heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .attention import causal_bias, project, resolve_scale
from .common import EpilogueGrads, accumulation_dtype, cast

DEFAULT_BLOCK = 256  # fallback path: fewer Python-level tiles; tests pass small blocks


class AttentionGrads(NamedTuple):
    x: Tensor
    w_q: Tensor
    w_k: Tensor
    diag: Tensor | None
    precond_diag: Tensor | None
    precond_lowrank: Tensor | None
    step_size: Tensor


class _StepState(NamedTuple):
    """What one step's core backward reads (all in the accumulation dtype)."""

    x: Tensor  # iterate x^t, (B, N, D)
    q: Tensor  # (B, H, N, Dh)
    lse: Tensor  # (B, H, N)
    head_output: Tensor  # o^t, (B, H, N, Dh)
    grad_head_output: Tensor  # do = W_Q dG, (B, H, N, Dh)
    grad_neg_grad: Tensor  # dG, (B, N, D)


class _Shared(NamedTuple):
    """Step-independent inputs of the core backward."""

    context: Tensor  # (B, N, D)
    keys: Tensor  # (B, H, N, Dh)
    diag: Tensor | None  # (D,) or (H, D)
    bias: Tensor  # (H or 1, N, N)
    scale: float
    block: int


def _blocks(n: int, block: int):
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _probs_tile(st: _StepState, sh: _Shared, qi: slice, kj: slice) -> Tensor:
    """Recompute P^k for a (query block, key block) tile from the saved log-sum-exp."""
    s = st.q[:, :, qi] @ sh.keys[:, :, kj].transpose(-1, -2)
    if sh.diag is not None:
        s = s + _diag_scores(st.x[:, qi], sh.context[:, kj], sh.diag)
    s = sh.scale * s + sh.bias[:, qi, kj]
    return torch.exp(s - st.lse[:, :, qi, None])


def _diag_scores(x: Tensor, c: Tensor, diag: Tensor) -> Tensor:
    """(lambda * x_i) . c_j: (B, 1, bq, bk) shared by all heads, or (B, H, bq, bk) per head."""
    if diag.dim() == 1:
        return ((x * diag) @ c.transpose(-1, -2))[:, None]
    return torch.einsum("bnd,hd,bmd->bhnm", x, diag, c)


def _diag_dp(y: Tensor, c: Tensor) -> Tensor:
    """dP's diagonal part y_i . c_j with y = lambda * dG: once for all heads when shared."""
    if y.dim() == 3:
        return (y @ c.transpose(-1, -2))[:, None]
    return y @ c[:, None].transpose(-1, -2)


def _core_backward(st: _StepState, sh: _Shared, grad_keys: Tensor, grad_context: Tensor):
    """Backward of G(x^t) given dG; adds into grad_keys and grad_context (key side).

    Returns (dx^t from the scores, dq, d lambda or None, row sums Pbar c or P^k c for d lambda).
    """
    n = st.x.shape[1]
    lam = sh.diag
    shared = lam is not None and lam.dim() == 1
    # y_i = lambda_k * dG_i is dObar^k_i, the gradient of the D-wide value term.
    y = None if lam is None else (lam * st.grad_neg_grad if shared else lam[None, :, None, :] * st.grad_neg_grad[:, None])
    # Delta_i = sum_j p_ij dp_ij = do_i . o_i + sum_j p_ij (y_i . c_j); the second part needs pass 1.
    delta = (st.grad_head_output * st.head_output).sum(-1)
    blocks = _blocks(n, sh.block)
    if lam is not None:
        for qs, qe in blocks:
            qi = slice(qs, qe)
            for ks, ke in blocks[: (qs // sh.block) + 1]:
                kj = slice(ks, ke)
                p = _probs_tile(st, sh, qi, kj)
                delta[:, :, qi] += (p * _diag_dp(y[..., qi, :], sh.context[:, kj])).sum(-1)

    grad_q = torch.zeros_like(st.q)
    # r_i = sum_j dS_ij c_j (head-summed when shared) and value rows Pbar c / P^k c for d lambda.
    row_dims = (st.x.shape[0], n, st.x.shape[2]) if shared else (st.x.shape[0], st.q.shape[1], n, st.x.shape[2])
    score_rows = st.x.new_zeros(row_dims) if lam is not None else None
    value_rows = st.x.new_zeros(row_dims) if lam is not None else None
    for qs, qe in blocks:
        qi = slice(qs, qe)
        for ks, ke in blocks[: (qs // sh.block) + 1]:
            kj = slice(ks, ke)
            p = _probs_tile(st, sh, qi, kj)
            dp = st.grad_head_output[:, :, qi] @ sh.keys[:, :, kj].transpose(-1, -2)
            if lam is not None:
                dp = dp + _diag_dp(y[..., qi, :], sh.context[:, kj])
            ds = p * (dp - delta[:, :, qi, None])
            grad_q[:, :, qi] += sh.scale * ds @ sh.keys[:, :, kj]
            grad_keys[:, :, kj] += sh.scale * ds.transpose(-1, -2) @ st.q[:, :, qi]
            grad_keys[:, :, kj] += p.transpose(-1, -2) @ st.grad_head_output[:, :, qi]
            if lam is None:
                continue
            c_j, x_i = sh.context[:, kj], st.x[:, qi]
            if shared:
                ds_bar, p_bar = ds.sum(1), p.sum(1)
                score_rows[:, qi] += ds_bar @ c_j
                value_rows[:, qi] += p_bar @ c_j
                grad_context[:, kj] += sh.scale * lam * (ds_bar.transpose(-1, -2) @ x_i)
                grad_context[:, kj] += p_bar.transpose(-1, -2) @ y[:, qi]
            else:
                score_rows[:, :, qi] += ds @ c_j[:, None]
                value_rows[:, :, qi] += p @ c_j[:, None]
                grad_context[:, kj] += sh.scale * torch.einsum("bhnm,bnd,hd->bmd", ds, x_i, lam)
                grad_context[:, kj] += torch.einsum("bhnm,bhnd->bmd", p, y[:, :, qi])

    if lam is None:
        return None, grad_q, None
    grad_x = sh.scale * (lam * score_rows if shared else torch.einsum("hd,bhnd->bnd", lam, score_rows))
    if shared:
        grad_diag = sh.scale * (st.x * score_rows).sum((0, 1)) + (value_rows * st.grad_neg_grad).sum((0, 1))
    else:
        grad_diag = sh.scale * (st.x[:, None] * score_rows).sum((0, 2)) + (
            value_rows * st.grad_neg_grad[:, None]
        ).sum((0, 2))
    return grad_x, grad_q, grad_diag


def attention_backward(
    grad_out: Tensor,
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    diag: Tensor | None,
    alibi_slopes: Tensor | None,
    precond_diag: Tensor | None,
    precond_lowrank: Tensor | None,
    step_size: Tensor,
    scale: float | None,
    iterates: Tensor,
    head_outputs: Tensor,
    diag_values: Tensor,
    lse: Tensor,
    block: int = DEFAULT_BLOCK,
) -> AttentionGrads:
    """All gradients of Delta = attention(...) given dDelta = grad_out and the saved forward state."""
    acc = accumulation_dtype(x.dtype)
    n = x.shape[1]
    steps = step_size.shape[0]
    context = x.to(acc)
    wq, wk, lam = w_q.to(acc), w_k.to(acc), cast(diag, acc)
    p_diag, p_lowrank, eta = cast(precond_diag, acc), cast(precond_lowrank, acc), step_size.to(acc)
    shared = _Shared(
        context=context,
        keys=project(context, wk, x.dtype),
        diag=lam,
        bias=causal_bias(alibi_slopes, n, acc, x.device),
        scale=resolve_scale(scale, w_q.shape[1]),
        block=block,
    )

    grad_iterate = grad_out.to(acc)  # a = d x^{t+1}; x^T enters Delta with sign +1
    grad_keys = torch.zeros_like(shared.keys)
    grad_context = torch.zeros_like(context)
    grad_wq = torch.zeros_like(wq)
    grad_diag = None if lam is None else torch.zeros_like(lam)
    epilogue = EpilogueGrads(eta, p_diag, p_lowrank)

    for t in reversed(range(steps)):
        x_t = context if t == 0 else iterates[t - 1].to(acc)
        o = head_outputs[t].to(acc).transpose(1, 2)  # (B, H, N, Dh)
        neg_grad = torch.einsum("bhne,hed->bnd", o, wq)
        if lam is not None:
            neg_grad = neg_grad + diag_values[t].to(acc)

        grad_g = epilogue.backward(t, grad_iterate, neg_grad)

        state = _StepState(
            x=x_t,
            q=project(x_t, wq, x.dtype),
            lse=lse[t].to(acc),
            head_output=o,
            grad_head_output=project(grad_g, wq),
            grad_neg_grad=grad_g,
        )
        grad_x_scores, grad_q, g_diag = _core_backward(state, shared, grad_keys, grad_context)
        # G = W_Q^T o (value side) and q = W_Q x (query side) both touch W_Q.
        grad_wq += torch.einsum("bhne,bnd->hed", o, grad_g) + torch.einsum("bhne,bnd->hed", grad_q, x_t)
        grad_iterate = grad_iterate + torch.einsum("bhne,hed->bnd", grad_q, wq)
        if lam is not None:
            grad_iterate = grad_iterate + grad_x_scores
            grad_diag += g_diag

    grad_wk = torch.einsum("bhne,bnd->hed", grad_keys, context)
    grad_context += torch.einsum("bhne,hed->bnd", grad_keys, wk)
    grad_x = grad_iterate + grad_context - grad_out.to(acc)
    return AttentionGrads(
        x=grad_x.to(x.dtype),
        w_q=grad_wq.to(w_q.dtype),
        w_k=grad_wk.to(w_k.dtype),
        diag=cast(grad_diag, x.dtype),
        precond_diag=cast(epilogue.precond_diag, x.dtype),
        precond_lowrank=cast(epilogue.precond_lowrank, x.dtype),
        step_size=epilogue.step_size.to(x.dtype),
    )
