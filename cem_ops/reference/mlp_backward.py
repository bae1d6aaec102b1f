"""Explicit backward pass of the CEM MLP (docs/backward.md), no autograd:

    gate u = v c once; a = dY
    for t = T-1 .. 0:
        d eta_t = <a, P G^t>;  dG = P (eta_t a);  dp, dU
        z = w x^t, f = phi(z), h = f * u;  dh = w dG
        dw += h^T dG + dz^T x^t  with dz = dh * u * phi'(z);  du += dh * f
        a += w^T dz
    dv = du^T c;  dc = v^T du;  dx = a + dc - dY
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .common import EpilogueGrads, accumulation_dtype, cast
from .mlp import activation_derivative, apply_activation


class MLPGrads(NamedTuple):
    x: Tensor
    w: Tensor
    v: Tensor
    precond_diag: Tensor | None
    precond_lowrank: Tensor | None
    step_size: Tensor


def mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    w: Tensor,
    v: Tensor,
    precond_diag: Tensor | None,
    precond_lowrank: Tensor | None,
    step_size: Tensor,
    activation_name: str,
    iterates: Tensor,
    neg_grads: Tensor,
) -> MLPGrads:
    acc = accumulation_dtype(x.dtype)
    context = x.to(acc)
    w_acc, v_acc = w.to(acc), v.to(acc)
    p_diag, p_lowrank, eta = cast(precond_diag, acc), cast(precond_lowrank, acc), step_size.to(acc)
    gate = context @ v_acc.transpose(0, 1)

    grad_iterate = grad_out.to(acc)
    grad_gate = gate.new_zeros(gate.shape)
    grad_w = w_acc.new_zeros(w_acc.shape)
    epilogue = EpilogueGrads(eta, p_diag, p_lowrank)

    for t in reversed(range(step_size.shape[0])):
        x_t = context if t == 0 else iterates[t - 1].to(acc)
        grad_g = epilogue.backward(t, grad_iterate, neg_grads[t].to(acc))

        z = x_t @ w_acc.transpose(0, 1)
        f = apply_activation(z, activation_name)
        grad_h = grad_g @ w_acc.transpose(0, 1)
        grad_z = grad_h * gate * activation_derivative(z, activation_name)
        grad_gate += grad_h * f
        flat = (-1, w.shape[0])
        grad_w += (f * gate).reshape(flat).transpose(0, 1) @ grad_g.reshape(-1, w.shape[1])
        grad_w += grad_z.reshape(flat).transpose(0, 1) @ x_t.reshape(-1, w.shape[1])
        grad_iterate = grad_iterate + grad_z @ w_acc

    grad_v = grad_gate.reshape(-1, v.shape[0]).transpose(0, 1) @ context.reshape(-1, v.shape[1])
    grad_x = grad_iterate + grad_gate @ v_acc - grad_out.to(acc)
    return MLPGrads(
        x=grad_x.to(x.dtype),
        w=grad_w.to(w.dtype),
        v=grad_v.to(v.dtype),
        precond_diag=cast(epilogue.precond_diag, x.dtype),
        precond_lowrank=cast(epilogue.precond_lowrank, x.dtype),
        step_size=epilogue.step_size.to(x.dtype),
    )
