"""cem::mlp and cem::mlp_energy: public functions, fake implementations of the kernel ops,
autograd through the explicit backward, and the reference fallback."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .backends import (
    check_devices_in_fake,
    refuse_forward_mode_ad,
    register_autocast,
    register_no_double_backward,
    register_reference_fallback,
)


def mlp(
    x: Tensor,
    w: Tensor,
    v: Tensor,
    *,
    precond_diag: Tensor | None = None,
    precond_lowrank: Tensor | None = None,
    step_size: Tensor,
    activation: str = "silu",
) -> Tensor:
    """CEM MLP: T steps x <- x + eta_t P G(x) on the element-wise energy, c = x^0.

    G(x) = w^T (phi(w x) * (v c)) with phi in {"silu", "gelu", "relu"} (gelu is the exact erf form).

    Args:
        x: (B, N, D) layer input; the initial iterate and the condition c.
        w: (M, D) projection through the nonlinearity, tied to the readout (W_down = w^T).
        v: (M, D) multiplicative projection applied to the condition c.
        precond_diag, precond_lowrank, step_size: as in :func:`cem_ops.attention`.
        activation: phi.

    Returns:
        (B, N, D) total update Delta = x^T - x^0 in the dtype of x, differentiable in x, w, v,
        precond_diag, precond_lowrank and step_size.
    """
    refuse_forward_mode_ad("mlp", x, w, v, precond_diag, precond_lowrank, step_size)
    return torch.ops.cem.mlp.default(x, w, v, precond_diag, precond_lowrank, step_size, activation)


def mlp_energy(x: Tensor, context: Tensor, w: Tensor, v: Tensor, *, activation: str = "silu") -> Tensor:
    """E(x | c) = -sum_m (v_m . c) Phi(w_m . x) with Phi' = phi and Phi(0) = 0; (B, N), dtype of x."""
    return torch.ops.cem.mlp_energy.default(x, context, w, v, activation)


@torch.library.register_fake("cem::mlp_fwd")
def _mlp_fwd_fake(x, w, v, precond_diag, precond_lowrank, step_size, activation, save):
    check_devices_in_fake(
        "mlp_fwd", x, w=w, v=v, precond_diag=precond_diag, precond_lowrank=precond_lowrank, step_size=step_size
    )
    out = x.new_empty(x.shape)
    if not save:
        return out, x.new_empty(0), x.new_empty(0)
    steps = step_size.shape[0]
    return out, x.new_empty(steps - 1, *x.shape), x.new_empty(steps, *x.shape)


@torch.library.register_fake("cem::mlp_bwd")
def _mlp_bwd_fake(grad_out, x, w, v, precond_diag, precond_lowrank, step_size, activation, iterates, neg_grads):
    check_devices_in_fake(
        "mlp_bwd", x, grad_out=grad_out, w=w, v=v, precond_diag=precond_diag, precond_lowrank=precond_lowrank,
        step_size=step_size, iterates=iterates, neg_grads=neg_grads,
    )
    def like(t):
        return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(x), like(w), like(v), like(precond_diag), like(precond_lowrank), like(step_size)


def _setup_context(ctx, inputs, output):
    x, w, v, precond_diag, precond_lowrank, step_size, activation, save = inputs
    _, iterates, neg_grads = output
    ctx.save_for_backward(x, w, v, precond_diag, precond_lowrank, step_size, iterates, neg_grads)
    ctx.activation = activation
    ctx.state_saved = save


def _backward(ctx, grad_out, *_unused_grads):
    if not ctx.state_saved:
        raise RuntimeError(
            "cem::mlp_fwd ran with save_for_backward=False, so it kept no state for a backward pass; "
            "call cem_ops.mlp (torch.ops.cem.mlp), which saves it whenever gradients are needed"
        )
    x, w, v, precond_diag, precond_lowrank, step_size, iterates, neg_grads = ctx.saved_tensors
    grads = torch.ops.cem.mlp_bwd.default(
        grad_out, x, w, v, precond_diag, precond_lowrank, step_size, ctx.activation, iterates, neg_grads
    )
    return (*grads, None, None)


torch.library.register_autograd("cem::mlp_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("mlp_bwd")


def _mlp_fwd_reference(x, w, v, precond_diag, precond_lowrank, step_size, activation, save):
    return tuple(reference.mlp_forward(x, w, v, precond_diag, precond_lowrank, step_size, activation, save))


def _mlp_bwd_reference(*args):
    return tuple(reference.mlp_backward(*args))


register_reference_fallback("mlp_fwd", _mlp_fwd_reference)
register_reference_fallback("mlp_bwd", _mlp_bwd_reference)
register_autocast("mlp")
register_autocast("mlp_energy")
