"""Hypothesis property tests: random points of the whole option space, op against reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cem_ops
from cem_ops import reference
from cem_ops.reference.mlp import ACTIVATIONS
from cem_ops.testing import AttentionCase, MLPCase, assert_matches_reference, relative_error

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

attention_cases = st.builds(
    AttentionCase,
    batch=st.integers(1, 3),
    seq=st.integers(1, 40),
    dim=st.integers(1, 20),
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 9),
    steps=st.integers(1, 4),
    diag=st.sampled_from(["none", "shared", "per_head"]),
    alibi=st.booleans(),
    precond_diag=st.booleans(),
    precond_rank=st.integers(0, 3),
    scale=st.one_of(st.none(), st.floats(0.05, 2.0)),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)


@PROPERTY_SETTINGS
@given(case=attention_cases, seed=st.integers(0, 2**31 - 1))
def test_attention_matches_reference_anywhere(case, seed):
    rng = torch.Generator().manual_seed(seed)
    # Random configurations can be ill-conditioned: the shared policy bounds float32 gradients by
    # the float32 error that the conditioning allows, not by the contract's 1e-4 alone.
    assert_matches_reference("attention", torch.ops.cem.attention, case.make(rng), rng)


mlp_cases = st.builds(
    MLPCase,
    batch=st.integers(1, 3),
    seq=st.integers(1, 20),
    dim=st.integers(1, 20),
    hidden=st.integers(1, 30),
    steps=st.integers(1, 4),
    precond_diag=st.booleans(),
    precond_rank=st.integers(0, 3),
    activation=st.sampled_from(ACTIVATIONS),
    dtype=st.just(torch.float64),
)


@PROPERTY_SETTINGS
@given(case=mlp_cases, seed=st.integers(0, 2**31 - 1))
def test_mlp_matches_reference_anywhere(case, seed):
    rng = torch.Generator().manual_seed(seed)
    inputs = case.make(rng, requires_grad=True)
    out = cem_ops.mlp(inputs.x, inputs.w, inputs.v, precond_diag=inputs.precond_diag,
                      precond_lowrank=inputs.precond_lowrank, step_size=inputs.step_size, activation=case.activation)
    want = reference.mlp(*inputs.args())
    assert relative_error(out, want) < 1e-11
    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs.differentiable(), grad_out, retain_graph=True)
    expected = torch.autograd.grad(want, inputs.differentiable(), grad_out)
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-10
