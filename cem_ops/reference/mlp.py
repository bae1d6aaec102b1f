"""Reference CEM MLP (cem-math.md section 3): the element-wise energy and its T-step descent.

    E(x | c) = -sum_m (v_m . c) Phi(w_m . x),  Phi' = phi
    G(x)     = w^T (phi(w x) * (v c)),        x^{t+1} = x^t + eta_{t+1} P G(x^t),  c = x^0

Same precision rule as the attention reference: iterates in the input dtype, Delta and all
reductions in the accumulation dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .common import accumulation_dtype, cast, precondition

ACTIVATIONS = ("silu", "gelu", "relu")


class MLPForward(NamedTuple):
    """out: (B, N, D) Delta; iterates: (T-1, B, N, D) x^1..x^{T-1}; neg_grads: (T, B, N, D) G(x^t)."""

    out: Tensor
    iterates: Tensor
    neg_grads: Tensor


def apply_activation(z: Tensor, name: str) -> Tensor:
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "relu":
        return torch.relu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_derivative(z: Tensor, name: str) -> Tensor:
    if name == "silu":
        sig = torch.sigmoid(z)
        return sig * (1 + z * (1 - sig))
    if name == "gelu":
        return _normal_cdf(z) + z * _normal_pdf(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_antiderivative(z: Tensor, name: str) -> Tensor:
    """Phi with Phi' = phi and Phi(0) = 0 (energies are defined up to a constant per token)."""
    if name == "relu":
        return torch.relu(z) ** 2 / 2
    if name == "gelu":
        return ((z * z - 1) * _normal_cdf(z) + z * _normal_pdf(z)) / 2 + 0.25
    if name == "silu":
        # Phi(z) = z softplus(z) + Li2(-e^z) + pi^2/12 for z <= 0, and Phi(z) = z^2/2 - Phi(-z),
        # from silu(z) = z + silu(-z), for z > 0, so e^z never overflows.
        neg = -z.abs()
        phi_neg = neg * torch.nn.functional.softplus(neg) + _dilog_of_minus(torch.exp(neg)) + math.pi**2 / 12
        return torch.where(z > 0, z * z / 2 - phi_neg, phi_neg)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _normal_pdf(z: Tensor) -> Tensor:
    return torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _dilog_of_minus(u: Tensor, terms: int = 60) -> Tensor:
    """Li2(-u) for u in [0, 1] by Landen's identity Li2(-u) = -Li2(u/(1+u)) - log(1+u)^2 / 2,
    whose series sum w^k / k^2 with w <= 1/2 converges geometrically."""
    w = u / (1 + u)
    total = torch.zeros_like(u)
    power = torch.ones_like(u)
    for k in range(1, terms + 1):
        power = power * w
        total = total + power / (k * k)
    return -total - torch.log1p(u) ** 2 / 2


def mlp_neg_grad(x: Tensor, gate: Tensor, w: Tensor, name: str) -> Tensor:
    """G(x) = w^T (phi(w x) * gate) where gate = v c."""
    return (apply_activation(x @ w.transpose(0, 1), name) * gate) @ w


def mlp_forward(
    x: Tensor,
    w: Tensor,
    v: Tensor,
    precond_diag: Tensor | None,
    precond_lowrank: Tensor | None,
    step_size: Tensor,
    activation_name: str = "silu",
    save_for_backward: bool = True,
) -> MLPForward:
    """T steps of x <- x + eta P G(x); returns Delta and (optionally) the backward state."""
    acc = accumulation_dtype(x.dtype)
    context = x.to(acc)
    w_acc = w.to(acc)
    gate = context @ v.to(acc).transpose(0, 1)  # v c: once per call
    p_diag, p_lowrank, eta = cast(precond_diag, acc), cast(precond_lowrank, acc), step_size.to(acc)
    delta = torch.zeros_like(context)
    x_t = x
    iterates, neg_grads = [], []
    for t in range(step_size.shape[0]):
        neg_grad = mlp_neg_grad(x_t.to(acc), gate, w_acc, activation_name)
        delta = delta + eta[t] * precondition(neg_grad, p_diag, p_lowrank)
        neg_grads.append(neg_grad.to(x.dtype))
        if t + 1 < step_size.shape[0]:
            x_t = (context + delta).to(x.dtype)
            iterates.append(x_t)
    out = delta.to(x.dtype)
    if not save_for_backward:  # distinct empty tensors: outputs must not alias
        return MLPForward(out, x.new_empty(0), x.new_empty(0))
    stacked_iterates = torch.stack(iterates) if iterates else x.new_empty(0, *x.shape)
    return MLPForward(out, stacked_iterates, torch.stack(neg_grads))


def mlp(
    x: Tensor,
    w: Tensor,
    v: Tensor,
    precond_diag: Tensor | None = None,
    precond_lowrank: Tensor | None = None,
    step_size: Tensor | None = None,
    activation: str = "silu",
) -> Tensor:
    """Delta = x^T - x^0 of the CEM MLP (reference, differentiable by autograd)."""
    if step_size is None:
        raise ValueError("step_size is required: a 1-D tensor of T >= 1 step sizes")
    return mlp_forward(x, w, v, precond_diag, precond_lowrank, step_size, activation, save_for_backward=False).out


def mlp_energy(x: Tensor, context: Tensor, w: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    """E(x | c) = -sum_m (v_m . c) Phi(w_m . x), shape (B, N), dtype of x."""
    acc = accumulation_dtype(x.dtype)
    gate = context.to(acc) @ v.to(acc).transpose(0, 1)
    phi = activation_antiderivative(x.to(acc) @ w.to(acc).transpose(0, 1), activation)
    return (-(gate * phi).sum(-1)).to(x.dtype)
