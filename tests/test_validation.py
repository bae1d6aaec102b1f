"""Bad input raises a clear error naming the argument: ValueError for shapes and values,
TypeError for dtypes. Nothing crashes, nothing is silently wrong."""

from __future__ import annotations

import math

import pytest
import torch

import cem_ops
from cem_ops.testing import AttentionCase, MLPCase


@pytest.fixture
def att(rng):
    return AttentionCase(batch=2, seq=5, dim=8, heads=2, head_dim=4, steps=2, diag="shared").make(rng)


@pytest.fixture
def mlp_in(rng):
    return MLPCase(dim=8, hidden=6).make(rng)


def call_attention(inputs, **changes):
    kwargs = dict(diag=inputs.diag, alibi_slopes=inputs.alibi_slopes, precond_diag=inputs.precond_diag,
                  precond_lowrank=inputs.precond_lowrank, step_size=inputs.step_size, scale=inputs.scale)
    positional = dict(x=inputs.x, w_q=inputs.w_q, w_k=inputs.w_k)
    for name, value in changes.items():
        (positional if name in positional else kwargs)[name] = value
    return cem_ops.attention(positional["x"], positional["w_q"], positional["w_k"], **kwargs)


ATTENTION_SHAPE_ERRORS = [
    ("x", lambda a: a.x[0], "x must be a 3-D tensor"),
    ("x", lambda a: a.x[..., :0], "D >= 1"),
    ("w_q", lambda a: a.w_q[..., :5], r"w_q must have shape \(H, Dh, D\)"),
    ("w_q", lambda a: a.w_q[0], r"w_q must have shape \(H, Dh, D\)"),
    ("w_k", lambda a: a.w_k[:, :3], "w_k must have the shape of w_q"),
    ("diag", lambda a: a.diag[:7], r"diag must have shape \(D,\)"),
    ("diag", lambda a: torch.stack([a.diag] * 3), r"\(H, D\) = \(2, 8\)"),
    ("alibi_slopes", lambda a: a.alibi_slopes[:1], r"alibi_slopes must have shape \(H,\)"),
    ("precond_diag", lambda a: a.precond_diag[:3], r"precond_diag must have shape \(D,\)"),
    ("precond_lowrank", lambda a: a.precond_lowrank[:4], r"precond_lowrank must have shape \(D, R\)"),
    ("precond_lowrank", lambda a: a.precond_lowrank[:, :0], "R >= 1"),
    ("step_size", lambda a: a.step_size[:0], "T >= 1"),
    ("step_size", lambda a: a.step_size[0], "1-D tensor"),
]


@pytest.mark.parametrize("name,corrupt,message", ATTENTION_SHAPE_ERRORS, ids=lambda v: v if isinstance(v, str) else "")
def test_attention_shape_errors(att, name, corrupt, message):
    with pytest.raises(ValueError, match=f"cem::attention: .*{message}"):
        call_attention(att, **{name: corrupt(att)})


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_attention_bad_scale(att, scale):
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        call_attention(att, scale=scale)


@pytest.mark.parametrize("name", ["w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size"])
def test_attention_mixed_dtypes(att, name):
    with pytest.raises(TypeError, match=f"{name} must have the dtype of x"):
        call_attention(att, **{name: getattr(att, name).double()})


@pytest.mark.parametrize("name", ["w_q", "diag", "step_size"])
def test_attention_mixed_devices(att, name):
    with pytest.raises(ValueError, match=f"{name} must be on the device of x"):
        call_attention(att, **{name: getattr(att, name).to("meta")})


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_attention_unsupported_dtype(att, dtype):
    with pytest.raises(TypeError, match="x must be float32, float64, bfloat16 or float16"):
        call_attention(att, x=att.x.to(dtype))


def test_attention_energy_errors(att):
    with pytest.raises(ValueError, match="cem::attention_energy: context must have the shape of x"):
        cem_ops.attention_energy(att.x, att.x[:, :3], att.w_q, att.w_k)
    with pytest.raises(TypeError, match="context must have the dtype of x"):
        cem_ops.attention_energy(att.x, att.x.double(), att.w_q, att.w_k)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        cem_ops.attention_energy(att.x, att.x, att.w_q, att.w_k, scale=math.nan)


def test_kernel_ops_validate_too(att):
    """The fwd/bwd ops can be called directly; they check their inputs as well."""
    with pytest.raises((ValueError, RuntimeError), match="w_q|shape|size"):
        torch.ops.cem.attention_fwd(att.x, att.w_q[..., :5], att.w_k, None, None, None, None, att.step_size, None, True)


def call_mlp(inputs, **changes):
    kwargs = dict(precond_diag=inputs.precond_diag, precond_lowrank=inputs.precond_lowrank,
                  step_size=inputs.step_size, activation=inputs.activation)
    positional = dict(x=inputs.x, w=inputs.w, v=inputs.v)
    for name, value in changes.items():
        (positional if name in positional else kwargs)[name] = value
    return cem_ops.mlp(positional["x"], positional["w"], positional["v"], **kwargs)


MLP_ERRORS = [
    ("x", lambda m: m.x[0], ValueError, "x must be a 3-D tensor"),
    ("w", lambda m: m.w[:, :5], ValueError, r"w must have shape \(M, D\)"),
    ("v", lambda m: m.v[:3], ValueError, "v must have the shape of w"),
    ("precond_diag", lambda m: m.precond_diag[:2], ValueError, r"precond_diag must have shape \(D,\)"),
    ("step_size", lambda m: m.step_size[:0], ValueError, "T >= 1"),
    ("w", lambda m: m.w.double(), TypeError, "w must have the dtype of x"),
    ("activation", lambda m: "tanh", ValueError, "activation must be one of 'silu', 'gelu', 'relu', got 'tanh'"),
]


@pytest.mark.parametrize("name,corrupt,error,message", MLP_ERRORS, ids=lambda v: v if isinstance(v, str) else "")
def test_mlp_errors(mlp_in, name, corrupt, error, message):
    with pytest.raises(error, match=f"cem::mlp: .*{message}"):
        call_mlp(mlp_in, **{name: corrupt(mlp_in)})


def test_mlp_energy_errors(mlp_in):
    with pytest.raises(ValueError, match="cem::mlp_energy: context must have the shape of x"):
        cem_ops.mlp_energy(mlp_in.x, mlp_in.x[:1], mlp_in.w, mlp_in.v)
    with pytest.raises(ValueError, match="activation must be one of"):
        cem_ops.mlp_energy(mlp_in.x, mlp_in.x, mlp_in.w, mlp_in.v, activation="swish")


def test_step_size_must_be_a_tensor(att):
    with pytest.raises((TypeError, RuntimeError), match="step_size"):
        call_attention(att, step_size=0.5)


# The backward ops are public too: their saved-state arguments are checked like any other input.
ATTENTION_STATE_ERRORS = [
    ("grad_out", lambda s: s["grad_out"][:, :-1], ValueError, "grad_out must have shape"),
    ("iterates", lambda s: s["iterates"][:0], ValueError, "iterates must have shape"),
    ("head_outputs", lambda s: s["head_outputs"].double(), TypeError, "head_outputs must have dtype"),
    ("diag_values", lambda s: s["diag_values"][..., :-1], ValueError, "diag_values must have shape"),
    ("lse", lambda s: s["lse"].transpose(2, 3), ValueError, "lse must have shape"),
]


@pytest.mark.parametrize("name,corrupt,error,message", ATTENTION_STATE_ERRORS, ids=[e[0] for e in ATTENTION_STATE_ERRORS])
def test_attention_bwd_state_errors(att, rng, name, corrupt, error, message):
    _, iterates, head_outputs, diag_values, lse = torch.ops.cem.attention_fwd(*att.args(), True)
    state = dict(
        grad_out=torch.randn(att.x.shape, generator=rng), iterates=iterates, head_outputs=head_outputs,
        diag_values=diag_values, lse=lse,
    )
    state[name] = corrupt(state)
    with pytest.raises(error, match=f"cem::attention_bwd: {message}"):
        torch.ops.cem.attention_bwd(
            state["grad_out"], *att.args(), state["iterates"], state["head_outputs"], state["diag_values"],
            state["lse"],
        )


MLP_STATE_ERRORS = [
    ("grad_out", lambda s: s["grad_out"].double(), TypeError, "grad_out must have dtype"),
    ("iterates", lambda s: s["iterates"][:, :1], ValueError, "iterates must have shape"),
    ("neg_grads", lambda s: s["neg_grads"][:1], ValueError, "neg_grads must have shape"),
]


@pytest.mark.parametrize("name,corrupt,error,message", MLP_STATE_ERRORS, ids=[e[0] for e in MLP_STATE_ERRORS])
def test_mlp_bwd_state_errors(rng, name, corrupt, error, message):
    inputs = MLPCase(dim=8, hidden=6, steps=3).make(rng)
    _, iterates, neg_grads = torch.ops.cem.mlp_fwd(*inputs.args(), True)
    state = dict(grad_out=torch.randn(inputs.x.shape, generator=rng), iterates=iterates, neg_grads=neg_grads)
    state[name] = corrupt(state)
    with pytest.raises(error, match=f"cem::mlp_bwd: {message}"):
        torch.ops.cem.mlp_bwd(state["grad_out"], *inputs.args(), state["iterates"], state["neg_grads"])


ATTENTION_ARGS = ("x", "w_q", "w_k", "diag", "alibi_slopes", "precond_diag", "precond_lowrank", "step_size")


@pytest.mark.parametrize("name", ATTENTION_ARGS[1:])
def test_kernel_ops_refuse_a_tensor_on_another_device(rng, name):
    """A meta tensor among CPU ones dispatches to the ops' fake implementations, which must refuse
    it as the kernels do (not return uninitialized outputs)."""
    inputs = AttentionCase(batch=1, seq=5, dim=8, heads=2, head_dim=4, steps=2, diag="shared", alibi=True,
                           precond_diag=True, precond_rank=2).make(rng)
    args = list(inputs.args())
    index = ATTENTION_ARGS.index(name)
    moved = args[:index] + [args[index].to("meta")] + args[index + 1:]
    with pytest.raises(ValueError, match=f"cem::attention_fwd: {name} must be on the device of x"):
        torch.ops.cem.attention_fwd(*moved, True)
    _, *state = torch.ops.cem.attention_fwd(*args, True)
    grad_out = torch.randn(inputs.x.shape, generator=rng)
    with pytest.raises(ValueError, match=f"cem::attention_bwd: {name} must be on the device of x"):
        torch.ops.cem.attention_bwd(grad_out, *moved, *state)


@pytest.mark.parametrize("name", ["grad_out", "iterates", "head_outputs", "diag_values", "lse"])
def test_attention_bwd_refuses_saved_state_on_another_device(att, rng, name):
    _, iterates, head_outputs, diag_values, lse = torch.ops.cem.attention_fwd(*att.args(), True)
    state = dict(grad_out=torch.randn(att.x.shape, generator=rng), iterates=iterates, head_outputs=head_outputs,
                 diag_values=diag_values, lse=lse)
    state[name] = state[name].to("meta")
    with pytest.raises(ValueError, match=f"cem::attention_bwd: {name} must be on the device of x"):
        torch.ops.cem.attention_bwd(state["grad_out"], *att.args(), *list(state.values())[1:])


@pytest.mark.parametrize("name", ["w", "step_size", "neg_grads"])
def test_mlp_kernel_ops_refuse_a_tensor_on_another_device(rng, name):
    inputs = MLPCase(dim=8, hidden=6, steps=2).make(rng)
    _, iterates, neg_grads = torch.ops.cem.mlp_fwd(*inputs.args(), True)
    args = dict(zip(("x", "w", "v", "precond_diag", "precond_lowrank", "step_size", "activation"), inputs.args()))
    state = dict(iterates=iterates, neg_grads=neg_grads)
    (args if name in args else state)[name] = (args | state)[name].to("meta")
    if name in args:
        with pytest.raises(ValueError, match=f"cem::mlp_fwd: {name} must be on the device of x"):
            torch.ops.cem.mlp_fwd(*args.values(), True)
    with pytest.raises(ValueError, match=f"cem::mlp_bwd: {name} must be on the device of x"):
        torch.ops.cem.mlp_bwd(torch.randn(inputs.x.shape, generator=rng), *args.values(), *state.values())
