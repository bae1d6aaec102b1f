"""cem::attention and cem::attention_energy: public functions, fake implementations of the
kernel ops, autograd through the explicit backward, and the reference fallback."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..reference.common import accumulation_dtype
from .backends import (
    check_devices_in_fake,
    refuse_forward_mode_ad,
    register_autocast,
    register_no_double_backward,
    register_reference_fallback,
)


def attention(
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    diag: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    precond_diag: Tensor | None = None,
    precond_lowrank: Tensor | None = None,
    step_size: Tensor,
    scale: float | None = None,
) -> Tensor:
    """CEM attention: T steps x <- x + eta_t P G(x) on the causal interaction energy.

    Args:
        x: (B, N, D) layer input; the initial iterate and the fixed causal context.
        w_q: (H, Dh, D) query projection, tied to the output projection (W_O = W_Q^T).
        w_k: (H, Dh, D) key projection, tied to the value projection (V = K).
        diag: None, (D,) shared by all heads, or (H, D) per head: the diagonal of A_k.
        alibi_slopes: None or (H,): bias -m_k (i - j) on the scores.
        precond_diag: None or (D,): p of the preconditioner P = diag(p) + U U^T (None: p = 1).
        precond_lowrank: None or (D, R): U of the preconditioner (None: U = 0).
        step_size: (T,) step sizes eta_1..eta_T; T = step_size.shape[0] >= 1.
        scale: beta; None means Dh^-1/2.

    Returns:
        (B, N, D) total update Delta = x^T - x^0 in the dtype of x. Differentiable in x, w_q,
        w_k, diag, precond_diag, precond_lowrank and step_size. All tensors share x's dtype
        (float32, float64, bfloat16, float16) and device.
    """
    refuse_forward_mode_ad("attention", x, w_q, w_k, diag, precond_diag, precond_lowrank, step_size)
    return torch.ops.cem.attention.default(
        x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale
    )


def attention_energy(
    x: Tensor,
    context: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    diag: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """E_i(x) = -(1/beta) sum_k log sum_{j<=i} exp(s^k_ij(x)) for iterate x given context.

    Returns (B, N) in the dtype of x; differentiable (its negative gradient in x is the update
    direction G). Memory is O(rows * N) per block of query rows without autograd.
    """
    return torch.ops.cem.attention_energy.default(x, context, w_q, w_k, diag, alibi_slopes, scale)


@torch.library.register_fake("cem::attention_fwd")
def _attention_fwd_fake(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, save):
    check_devices_in_fake(
        "attention_fwd", x, w_q=w_q, w_k=w_k, diag=diag, alibi_slopes=alibi_slopes, precond_diag=precond_diag,
        precond_lowrank=precond_lowrank, step_size=step_size,
    )
    batch, n, dim = x.shape
    heads, head_dim, _ = w_q.shape
    steps = step_size.shape[0]
    acc = accumulation_dtype(x.dtype)
    out = x.new_empty(batch, n, dim)
    if not save:
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=acc)
    return (
        out,
        x.new_empty(steps - 1, batch, n, dim),
        x.new_empty(steps, batch, n, heads, head_dim),
        x.new_empty(steps, batch, n, dim) if diag is not None else x.new_empty(0),
        x.new_empty(steps, batch, heads, n, dtype=acc),
    )


@torch.library.register_fake("cem::attention_bwd")
def _attention_bwd_fake(grad_out, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale,
                        iterates, head_outputs, diag_values, lse):
    check_devices_in_fake(
        "attention_bwd", x, grad_out=grad_out, w_q=w_q, w_k=w_k, diag=diag, alibi_slopes=alibi_slopes,
        precond_diag=precond_diag, precond_lowrank=precond_lowrank, step_size=step_size, iterates=iterates,
        head_outputs=head_outputs, diag_values=diag_values, lse=lse,
    )

    def like(t):
        return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(x), like(w_q), like(w_k), like(diag), like(precond_diag), like(precond_lowrank), like(step_size)


def _setup_context(ctx, inputs, output):
    x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, save = inputs
    _, iterates, head_outputs, diag_values, lse = output
    ctx.save_for_backward(
        x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, iterates, head_outputs, diag_values, lse
    )
    ctx.scale = scale
    ctx.state_saved = save


def _backward(ctx, grad_out, *_unused_grads):
    if not ctx.state_saved:
        raise RuntimeError(
            "cem::attention_fwd ran with save_for_backward=False, so it kept no state for a backward pass; "
            "call cem_ops.attention (torch.ops.cem.attention), which saves it whenever gradients are needed"
        )
    x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, *state = ctx.saved_tensors
    grads = torch.ops.cem.attention_bwd.default(
        grad_out, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, ctx.scale, *state
    )
    grad_x, grad_wq, grad_wk, grad_diag, grad_pd, grad_pu, grad_step = grads
    return grad_x, grad_wq, grad_wk, grad_diag, None, grad_pd, grad_pu, grad_step, None, None


torch.library.register_autograd("cem::attention_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("attention_bwd")


def _attention_fwd_reference(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, save):
    return tuple(
        reference.attention_forward(
            x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, save
        )
    )


def _attention_bwd_reference(*args):
    return tuple(reference.attention_backward(*args))


register_reference_fallback("attention_fwd", _attention_fwd_reference)
register_reference_fallback("attention_bwd", _attention_bwd_reference)
register_autocast("attention")
register_autocast("attention_energy")
