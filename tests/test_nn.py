"""cem_ops.nn modules: parameterization, parameter counts, dtype handling, agreement with the ops."""

from __future__ import annotations

import pytest
import torch

import cem_ops
from cem_ops.nn import CEMMLP, CEMAttention, CEMBlock, LlamaAttention, LlamaBlock, Preconditioner, SwiGLU, alibi_slopes
from cem_ops.testing import relative_error


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dim,heads", [(64, 4), (96, 3), (128, 8)])
def test_cem_attention_has_half_the_projection_parameters_of_llama(dim, heads):
    cem = CEMAttention(dim, heads, diag="none")
    llama = LlamaAttention(dim, heads)
    assert 2 * count(cem) - 2 * cem.step_size.numel() == count(llama)


def test_cem_mlp_has_two_thirds_the_parameters_of_swiglu_at_equal_width():
    assert 3 * (count(CEMMLP(32, 80)) - 1) == 2 * count(SwiGLU(32, 80))


@pytest.mark.parametrize("diag", ["none", "shared", "per_head"])
@pytest.mark.parametrize("precond", ["none", "diag", "lowrank", "diag_lowrank"])
def test_cem_attention_module_matches_op(diag, precond, rng):
    torch.manual_seed(rng.initial_seed())
    module = CEMAttention(12, 3, steps=2, diag=diag, precond=precond, precond_rank=2)
    with torch.no_grad():
        if module.diag is not None:
            module.diag.normal_()  # the init is zero; exercise a live diagonal
    x = torch.randn(2, 9, 12, generator=rng)
    p, u = module.preconditioner(torch.float32)
    expected = cem_ops.attention(x, module.w_q, module.w_k, diag=module.diag, alibi_slopes=module.alibi_slopes,
                                 precond_diag=p, precond_lowrank=u, step_size=module.step_size)
    assert relative_error(module(x), expected) < 1e-6
    assert module.energy(x).shape == (2, 9)


def test_preconditioner_is_positive_and_starts_at_identity():
    pre = Preconditioner(6, "diag_lowrank", rank=2)
    p, u = pre(torch.float32)
    assert torch.allclose(p, torch.ones(6)) and u.shape == (6, 2) and u.abs().sum() > 0
    with torch.no_grad():
        pre.rho.fill_(-50.0)
    assert (pre(torch.float32)[0] > 0).all()
    # softplus(-20) = 2e-9 underflows in float16 (and below about -104 in float32): p stays a
    # positive normal number there, and rho still gets a gradient.
    with torch.no_grad():
        pre.rho.fill_(-20.0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = pre(dtype)[0]
        assert p.dtype == dtype and (p >= torch.finfo(dtype).tiny).all(), dtype
    pre(torch.float16)[0].float().sum().backward()
    assert pre.rho.grad is not None and (pre.rho.grad > 0).all()
    with pytest.raises(ValueError, match="precond must be one of"):
        Preconditioner(6, "full")


def test_module_errors():
    with pytest.raises(ValueError, match="diag must be one of"):
        CEMAttention(8, 2, diag="sometimes")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        CEMAttention(8, 2, steps=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        CEMMLP(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="RoPE needs an even head_dim"):
        LlamaAttention(9, 3)


def test_alibi_slopes_are_geometric():
    assert torch.allclose(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    six = alibi_slopes(6)
    assert torch.allclose(six[:4], alibi_slopes(4)) and torch.allclose(six[4:], alibi_slopes(8)[0::2][:2])


def test_low_precision_input_with_float32_parameters(rng):
    torch.manual_seed(rng.initial_seed())
    block = CEMBlock(16, 2, attention_kwargs=dict(steps=2), mlp_kwargs=dict(steps=2))
    x = torch.randn(2, 7, 16, generator=rng)
    y32 = block(x)
    y16 = block(x.bfloat16())  # parameters stay float32 and are cast at the op boundary
    assert y16.dtype == torch.bfloat16
    assert relative_error(y16, y32) < 3e-2


def test_blocks_train(rng):
    """A few optimizer steps on a fixed batch lower the loss for the CEM and Llama blocks."""
    torch.manual_seed(rng.initial_seed())
    x = torch.randn(4, 12, 16, generator=rng)
    target = torch.randn(4, 12, 16, generator=rng)
    for block in (CEMBlock(16, 2, attention_kwargs=dict(steps=2, precond="diag")), LlamaBlock(16, 2)):
        opt = torch.optim.Adam(block.parameters(), lr=1e-2)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = (block(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0]


def test_recursion_differs_from_applying_the_block_twice(rng):
    """T = 2 moves only the query-side iterate; applying a T = 1 layer twice also moves the context."""
    torch.manual_seed(rng.initial_seed())
    two_steps = CEMAttention(8, 2, steps=2, diag="shared")
    one_step = CEMAttention(8, 2, steps=1, diag="shared")
    one_step.load_state_dict({k: (v[:1] if k == "step_size" else v) for k, v in two_steps.state_dict().items()})
    x = torch.randn(1, 6, 8, generator=rng)
    reused = one_step(x) + one_step(x + one_step(x))
    assert relative_error(two_steps(x), reused) > 1e-3


def test_ops_follow_autocast(rng):
    """Under torch.autocast the CEM ops run in the autocast dtype, like the matmuls around them."""
    torch.manual_seed(rng.initial_seed())
    block = CEMBlock(16, 2, attention_kwargs=dict(steps=2), mlp_kwargs=dict(steps=2))
    x = torch.randn(2, 7, 16, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention_out = block.attention(x)
        mlp_out = block.mlp(x)
        energy = block.attention.energy(x)
    assert attention_out.dtype == mlp_out.dtype == energy.dtype == torch.bfloat16
    assert relative_error(attention_out, block.attention(x)) < 3e-2
    assert relative_error(mlp_out, block.mlp(x)) < 3e-2


def test_backward_inside_autocast(rng):
    """Autograd runs the backward under the caller's autocast state: the gradients must be the
    same as with the backward outside it."""
    torch.manual_seed(rng.initial_seed())
    block = CEMBlock(
        16, 2, attention_kwargs=dict(steps=2, precond="diag_lowrank"), mlp_kwargs=dict(steps=2, precond="diag")
    )
    x = torch.randn(2, 7, 16, generator=rng)

    def gradients(backward_inside: bool) -> list[torch.Tensor]:
        block.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = block(x).float().square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [p.grad.clone() for p in block.parameters() if p.grad is not None]

    outside, inside = gradients(False), gradients(True)
    assert len(inside) == len(outside) > 0
    for got, want in zip(inside, outside):
        assert relative_error(got, want) < 1e-2
