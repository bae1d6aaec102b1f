"""The reference checks itself: explicit backward = autograd, update = -grad(energy), and the
special cases where CEM reduces to familiar layers."""

from __future__ import annotations

import pytest
import torch

import cem_ops
from cem_ops import reference
from cem_ops.reference.mlp import ACTIVATIONS, activation_antiderivative, apply_activation
from cem_ops.testing import AttentionCase, MLPCase, relative_error

F64 = torch.float64
DIAGS = ("none", "shared", "per_head")
PRECONDS = [(False, 0), (True, 0), (False, 2), (True, 3)]  # (precond_diag, precond_rank)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: f"p{int(p[0])}r{p[1]}")
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("diag", DIAGS)
def test_explicit_attention_backward_matches_autograd(diag, alibi, precond, steps, rng, record_error):
    case = AttentionCase(batch=2, seq=11, dim=6, heads=2, head_dim=3, steps=steps, diag=diag, alibi=alibi,
                         precond_diag=precond[0], precond_rank=precond[1], dtype=F64)
    inputs = case.make(rng, requires_grad=True)
    fwd = reference.attention_forward(*inputs.args())
    grad_out = torch.randn(fwd.out.shape, generator=rng, dtype=F64)
    expected = torch.autograd.grad(fwd.out, inputs.differentiable(), grad_out)
    # Block 4 does not divide N = 11: ragged tiles on both axes.
    grads = reference.attention_backward(grad_out, *inputs.args(), *fwd[1:], block=4)
    explicit = [g for g in grads if g is not None]
    assert len(explicit) == len(expected)
    for got, want in zip(explicit, expected):
        assert record_error("float64 explicit attention backward vs autograd", relative_error(got, want)) < 1e-12


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: f"p{int(p[0])}r{p[1]}")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_explicit_mlp_backward_matches_autograd(activation, precond, steps, rng, record_error):
    case = MLPCase(batch=2, seq=5, dim=6, hidden=9, steps=steps, precond_diag=precond[0],
                   precond_rank=precond[1], activation=activation, dtype=F64)
    inputs = case.make(rng, requires_grad=True)
    fwd = reference.mlp_forward(*inputs.args())
    grad_out = torch.randn(fwd.out.shape, generator=rng, dtype=F64)
    expected = torch.autograd.grad(fwd.out, inputs.differentiable(), grad_out)
    grads = [g for g in reference.mlp_backward(grad_out, *inputs.args(), *fwd[1:]) if g is not None]
    for got, want in zip(grads, expected):
        assert record_error("float64 explicit mlp backward vs autograd", relative_error(got, want)) < 1e-12


def _descend(energy, inputs_x, step_size, precond_diag, precond_lowrank):
    """Delta of T steps x <- x + eta P (-grad E(x | c = x^0)), with grad E from autograd."""
    x0 = inputs_x.detach()
    x = x0.clone()
    for eta in step_size:
        x_var = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(x_var, x0).sum(), x_var)
        x = x + eta * reference.common.precondition(-grad, precond_diag, precond_lowrank)
    return x - x0


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("diag", DIAGS)
def test_attention_update_is_minus_energy_gradient(diag, steps, rng):
    inputs = AttentionCase(seq=9, steps=steps, diag=diag, dtype=F64).make(rng)

    def energy(x, context):
        return cem_ops.attention_energy(x, context, inputs.w_q, inputs.w_k, diag=inputs.diag,
                                        alibi_slopes=inputs.alibi_slopes, scale=inputs.scale)

    expected = _descend(energy, inputs.x, inputs.step_size, inputs.precond_diag, inputs.precond_lowrank)
    assert relative_error(torch.ops.cem.attention(*inputs.args()), expected) < 1e-12


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_update_is_minus_energy_gradient(activation, steps, rng):
    inputs = MLPCase(steps=steps, activation=activation, dtype=F64).make(rng)

    def energy(x, context):
        return cem_ops.mlp_energy(x, context, inputs.w, inputs.v, activation=activation)

    expected = _descend(energy, inputs.x, inputs.step_size, inputs.precond_diag, inputs.precond_lowrank)
    assert relative_error(torch.ops.cem.mlp(*inputs.args()), expected) < 1e-12


@pytest.mark.parametrize("alibi", [False, True])
def test_single_step_is_tied_multi_head_attention(alibi, rng):
    """T = 1, p = 1, U = 0, eta = 1, no diagonal: causal MHA with V = K and W_O = W_Q^T."""
    case = AttentionCase(seq=10, dim=12, heads=3, head_dim=4, steps=1, diag="none", alibi=alibi,
                         precond_diag=False, precond_rank=0, dtype=F64)
    inputs = case.make(rng)
    inputs.step_size = torch.ones(1, dtype=F64)
    q = torch.einsum("bnd,hed->bhne", inputs.x, inputs.w_q)
    k = torch.einsum("bnd,hed->bhne", inputs.x, inputs.w_k)
    pos = torch.arange(case.seq)
    distance = (pos[:, None] - pos[None, :]).to(F64)
    slopes = inputs.alibi_slopes if alibi else torch.zeros(case.heads, dtype=F64)
    bias = (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=bias)
    expected = torch.einsum("bhne,hed->bnd", o, inputs.w_q)
    assert relative_error(cem_ops.attention(inputs.x, inputs.w_q, inputs.w_k, alibi_slopes=inputs.alibi_slopes,
                                            step_size=inputs.step_size), expected) < 1e-12


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_single_step_mlp_is_tied_gated_mlp(activation, rng):
    inputs = MLPCase(steps=1, precond_diag=False, precond_rank=0, activation=activation, dtype=F64).make(rng)
    x, w, v = inputs.x, inputs.w, inputs.v
    expected = inputs.step_size[0] * (apply_activation(x @ w.T, activation) * (x @ v.T)) @ w
    assert relative_error(cem_ops.mlp(x, w, v, step_size=inputs.step_size, activation=activation), expected) < 1e-12


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_antiderivative_matches_quadrature(activation):
    """Phi(z) = integral_0^z phi, by the trapezoid rule on a fine grid (error ~ h^2 ~ 1e-9)."""
    grid = torch.linspace(-30, 30, 600_001, dtype=F64)
    values = apply_activation(grid, activation)
    cumulative = torch.cat([torch.zeros(1, dtype=F64),
                            torch.cumsum((values[1:] + values[:-1]) / 2 * (grid[1] - grid[0]), 0)])
    at_zero = cumulative[300_000]
    picks = torch.arange(0, 600_001, 7_919)
    expected = cumulative[picks] - at_zero
    got = activation_antiderivative(grid[picks], activation)
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_energy_ops_match_reference(dtype, rng):
    att = AttentionCase(seq=9, diag="per_head", dtype=dtype).make(rng)
    context = torch.randn(att.x.shape, generator=rng).to(dtype)
    got = cem_ops.attention_energy(att.x, context, att.w_q, att.w_k, diag=att.diag, alibi_slopes=att.alibi_slopes)
    want = reference.attention_energy(*(t.to(F64) for t in (att.x, context, att.w_q, att.w_k, att.diag)),
                                      att.alibi_slopes.to(F64))
    tol = 1e-12 if dtype == F64 else 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    assert got.dtype == dtype and relative_error(got, want) < tol
    for activation in ACTIVATIONS:
        mlp_in = MLPCase(activation=activation, dtype=dtype).make(rng)
        got = cem_ops.mlp_energy(mlp_in.x, context[:, :7, :12], mlp_in.w, mlp_in.v, activation=activation)
        want = reference.mlp_energy(mlp_in.x.to(F64), context[:, :7, :12].to(F64), mlp_in.w.to(F64),
                                    mlp_in.v.to(F64), activation)
        assert relative_error(got, want) < tol


def test_attention_energy_is_chunked_exactly(rng):
    """Rows are processed in blocks; a long sequence crosses block edges without changing values."""
    att = AttentionCase(batch=1, seq=300, dim=4, heads=1, head_dim=2, dtype=F64).make(rng)
    got = cem_ops.attention_energy(att.x, att.x, att.w_q, att.w_k, diag=att.diag, alibi_slopes=att.alibi_slopes)
    want = reference.attention_energy(att.x, att.x, att.w_q, att.w_k, att.diag, att.alibi_slopes)
    assert relative_error(got, want) < 1e-12
