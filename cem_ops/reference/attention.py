"""Reference CEM attention (cem-math.md section 2): plain dense PyTorch, differentiable by autograd.

Clarity over speed: every step materializes the (B, H, N, N) scores. The fused implementations
must agree with this file; the explicit backward in ``attention_backward.py`` must agree with
autograd through it.

Precision rule shared by every implementation: the iterate x^t that feeds the projections is
stored in the input dtype; the running update Delta^t = x^t - x^0 and all reductions are kept
in the accumulation dtype (float32, float64 for float64 inputs):

    Delta^0 = 0,  Delta^{t+1} = Delta^t + eta_{t+1} P G(x^t),  x^{t+1} = round(x^0 + Delta^{t+1})
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .common import accumulation_dtype, cast, precondition


class AttentionForward(NamedTuple):
    """Output of the forward pass and the state the backward pass recomputes from.

    out:          (B, N, D)          Delta = x^T - x^0, dtype of x
    iterates:     (T-1, B, N, D)     x^1 .. x^{T-1} (x^0 is the input), dtype of x
    head_outputs: (T, B, N, H, Dh)   o^k_i = sum_j p^k_ij k^k_j per step, dtype of x
    diag_values:  (T, B, N, D)       sum_k lambda_k * obar^k_i per step (empty without a diagonal)
    lse:          (T, B, H, N)       per-step log-sum-exp of the scores, accumulation dtype
    """

    out: Tensor
    iterates: Tensor
    head_outputs: Tensor
    diag_values: Tensor
    lse: Tensor


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def causal_bias(alibi_slopes: Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H or 1, N, N): -m_k (i - j) for j <= i, -inf above the diagonal."""
    pos = torch.arange(n, device=device)
    distance = (pos[:, None] - pos[None, :]).to(dtype)
    if alibi_slopes is None:
        bias = torch.zeros(1, n, n, dtype=dtype, device=device)
    else:
        bias = -alibi_slopes.to(dtype)[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))


def project(x: Tensor, w: Tensor, storage: torch.dtype | None = None) -> Tensor:
    """(B, N, D) x (H, Dh, D) -> (B, H, N, Dh), rounded through ``storage`` (the input dtype)
    as a tensor-core kernel stores q and k, so that all backends share the same operands."""
    out = torch.einsum("bnd,hed->bhne", x, w)
    return out if storage is None or storage == out.dtype else out.to(storage).to(out.dtype)


def scores(
    x: Tensor, context: Tensor, keys: Tensor, w_q: Tensor, diag: Tensor | None, bias: Tensor, scale: float,
    storage: torch.dtype | None = None,
) -> Tensor:
    """s^k_ij = beta (q^k_i . k^k_j + (lambda_k * x_i) . c_j) + b^k_ij, shape (B, H, N, N)."""
    s = project(x, w_q, storage) @ keys.transpose(-1, -2)
    if diag is not None and diag.dim() == 1:
        s = s + ((x * diag) @ context.transpose(-1, -2))[:, None]
    elif diag is not None:
        s = s + torch.einsum("bnd,hd,bmd->bhnm", x, diag, context)
    return scale * s + bias


def diag_value_term(probs: Tensor, context: Tensor, diag: Tensor) -> Tensor:
    """sum_k lambda_k * (P^k c); for a shared diagonal lambda * (Pbar c) with Pbar = sum_k P^k."""
    if diag.dim() == 1:
        return diag * (probs.sum(1) @ context)
    return torch.einsum("bhnm,bmd,hd->bnd", probs, context, diag)


class AttentionStep(NamedTuple):
    neg_grad: Tensor  # G(x) = -grad E(x), (B, N, D)
    head_output: Tensor  # o^k, (B, H, N, Dh)
    diag_value: Tensor | None  # sum_k lambda_k * obar^k, (B, N, D)
    lse: Tensor  # (B, H, N)


def attention_step(
    x: Tensor, context: Tensor, keys: Tensor, w_q: Tensor, diag: Tensor | None, bias: Tensor, scale: float,
    storage: torch.dtype | None = None,
) -> AttentionStep:
    """G(x) = sum_k W_Qk^T o^k + sum_k lambda_k * obar^k for one iterate (all in one dtype)."""
    s = scores(x, context, keys, w_q, diag, bias, scale, storage)
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - lse[..., None])
    o = probs @ keys
    neg_grad = torch.einsum("bhne,hed->bnd", o, w_q)
    diag_value = None if diag is None else diag_value_term(probs, context, diag)
    if diag_value is not None:
        neg_grad = neg_grad + diag_value
    return AttentionStep(neg_grad, o, diag_value, lse)


def attention_forward(
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    diag: Tensor | None,
    alibi_slopes: Tensor | None,
    precond_diag: Tensor | None,
    precond_lowrank: Tensor | None,
    step_size: Tensor,
    scale: float | None,
    save_for_backward: bool = True,
) -> AttentionForward:
    """T steps of x <- x + eta P G(x); returns Delta and (optionally) the backward state."""
    acc = accumulation_dtype(x.dtype)
    batch, n, dim = x.shape
    heads, head_dim, _ = w_q.shape
    beta = resolve_scale(scale, head_dim)
    context = x.to(acc)
    wq, wk, lam = w_q.to(acc), w_k.to(acc), cast(diag, acc)
    p_diag, p_lowrank, eta = cast(precond_diag, acc), cast(precond_lowrank, acc), step_size.to(acc)
    keys = project(context, wk, x.dtype)  # once per call: the context never moves
    bias = causal_bias(alibi_slopes, n, acc, x.device)

    delta = torch.zeros_like(context)
    x_t = x
    iterates, head_outputs, diag_values, lses = [], [], [], []
    for t in range(step_size.shape[0]):
        step = attention_step(x_t.to(acc), context, keys, wq, lam, bias, beta, x.dtype)
        delta = delta + eta[t] * precondition(step.neg_grad, p_diag, p_lowrank)
        head_outputs.append(step.head_output.transpose(1, 2).to(x.dtype))
        if step.diag_value is not None:
            diag_values.append(step.diag_value.to(x.dtype))
        lses.append(step.lse)
        if t + 1 < step_size.shape[0]:
            x_t = (context + delta).to(x.dtype)
            iterates.append(x_t)

    out = delta.to(x.dtype)
    if not save_for_backward:  # distinct empty tensors: outputs must not alias
        return AttentionForward(out, x.new_empty(0), x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=acc))
    return AttentionForward(
        out,
        torch.stack(iterates) if iterates else x.new_empty(0, batch, n, dim),
        torch.stack(head_outputs),
        torch.stack(diag_values) if diag_values else x.new_empty(0),
        torch.stack(lses),
    )


def attention(
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    diag: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    precond_diag: Tensor | None = None,
    precond_lowrank: Tensor | None = None,
    step_size: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Delta = x^T - x^0 of CEM attention (reference, differentiable by autograd)."""
    if step_size is None:
        raise ValueError("step_size is required: a 1-D tensor of T >= 1 step sizes")
    fwd = attention_forward(
        x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale,
        save_for_backward=False,
    )
    return fwd.out


def attention_step_at(x: Tensor, context: Tensor, w_q: Tensor, w_k: Tensor, diag: Tensor | None = None,
                      alibi_slopes: Tensor | None = None, scale: float | None = None,
                      storage: torch.dtype | None = None) -> AttentionStep:
    """One step's quantities (G, o, the diagonal's value term, lse) for iterate x given a context,
    in the accumulation dtype of x; q and k rounded through ``storage`` as in attention_forward."""
    acc = accumulation_dtype(x.dtype)
    beta = resolve_scale(scale, w_q.shape[1])
    c = context.to(acc)
    keys = project(c, w_k.to(acc), storage)
    bias = causal_bias(alibi_slopes, x.shape[1], acc, x.device)
    return attention_step(x.to(acc), c, keys, w_q.to(acc), cast(diag, acc), bias, beta, storage)


def attention_neg_grad(
    x: Tensor,
    context: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    diag: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """G(x) = -grad E(x) for iterate x and context c, shape (B, N, D), accumulation dtype."""
    return attention_step_at(x, context, w_q, w_k, diag, alibi_slopes, scale).neg_grad


def attention_energy(
    x: Tensor,
    context: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    diag: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """E_i(x) = -(1/beta) sum_k log sum_{j<=i} exp(s^k_ij(x)), shape (B, N), dtype of x."""
    step = attention_step_at(x, context, w_q, w_k, diag, alibi_slopes, scale)
    return (-step.lse.sum(1) / resolve_scale(scale, w_q.shape[1])).to(x.dtype)
