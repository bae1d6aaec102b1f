"""The one correctness policy every backend is held to: an op's output and gradients against the
float64 reference on the same (rounded) inputs.

  float64: output and gradients within TOLERANCES[float64];
  float32: output within 1e-4; gradients within error_bound of the larger of the float32
           reference's own error and rounding_sensitivity (what float32-sized input noise does);
  bfloat16/float16: output within 1e-2; gradients low_precision_agrees with the reference forward
           + explicit backward run at the same precision (the rounding points of every backend).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import reference
from .tolerances import TOLERANCES, error_bound, low_precision_agrees, relative_error, rounding_sensitivity

F64 = torch.float64

# kind -> (differentiable reference, its forward with saved state, its explicit backward)
_REFERENCES = {
    "attention": (reference.attention, reference.attention_forward, reference.attention_backward),
    "mlp": (reference.mlp, reference.mlp_forward, reference.mlp_backward),
}


def output_and_gradients(fn, inputs, dtype: torch.dtype, grad_out: torch.Tensor):
    """fn (schema order) on a fresh copy of ``inputs`` in ``dtype``: its output and the gradients
    of sum(out * grad_out) for inputs.differentiable_names(), in that order."""
    leaves = inputs.to(dtype, requires_grad=True)
    out = fn(*leaves.args())
    return out, torch.autograd.grad(out, leaves.differentiable(), grad_out.to(out.dtype))


def _explicit_gradients(kind, inputs, grad_out):
    """Gradients of the reference forward + explicit backward at the inputs' precision."""
    _, forward, backward = _REFERENCES[kind]
    state = forward(*inputs.args())
    grads = backward(grad_out.to(inputs.x.dtype), *inputs.args(), *state[1:])
    return [g for g in grads if g is not None]


def _no_record(kind: str, value: float) -> float:
    return value


def assert_matches_reference(kind: str, op: Callable, inputs, generator: torch.Generator,
                             record_error: Callable[[str, float], float] = _no_record, context: str = "") -> None:
    """Run ``op`` (schema order, like torch.ops.cem.attention or .mlp) and its backward on
    ``inputs`` (AttentionInputs/MLPInputs, on any device) and assert the policy above.
    ``record_error(kind, value)`` sees every error measured; ``context`` prefixes failures."""
    reference_fn = _REFERENCES[kind][0]
    dtype = inputs.x.dtype
    prefix = f"{context}: " if context else ""
    # The upstream gradient is an input of the backward: round it like the other inputs.
    grad_out = torch.randn(inputs.x.shape, generator=generator, dtype=F64).to(dtype).to(F64).to(inputs.x.device)
    out, got = output_and_gradients(op, inputs, dtype, grad_out)
    want, expected = output_and_gradients(reference_fn, inputs, F64, grad_out)
    assert out.dtype == dtype and out.shape == inputs.x.shape, f"{prefix}output {out.dtype} {tuple(out.shape)}"
    err = record_error(f"{kind} forward {dtype}", relative_error(out, want))
    assert err < TOLERANCES[dtype], f"{prefix}output: error {err:.2e}, bound {TOLERANCES[dtype]:.0e}"

    same_precision = expected
    sensitivity = [0.0] * len(expected)
    if dtype == torch.float32:
        _, same_precision = output_and_gradients(reference_fn, inputs, dtype, grad_out)
        sensitivity = rounding_sensitivity(reference_fn, inputs, grad_out, expected, generator)
    elif dtype != F64:
        same_precision = _explicit_gradients(kind, inputs.to(dtype), grad_out)
    failures = []
    names = inputs.differentiable_names()
    for name, g, e, s, noise in zip(names, got, expected, same_precision, sensitivity):
        assert g.dtype == dtype and g.shape == e.shape, f"{prefix}grad {name}: {g.dtype} {tuple(g.shape)}"
        err = record_error(f"{kind} gradients {dtype} vs float64", relative_error(g, e))
        if dtype in (F64, torch.float32):
            bound = error_bound(dtype, max(relative_error(s, e), noise))
            if not err < bound:
                failures.append(f"grad {name}: error {err:.2e}, bound {bound:.2e}")
        else:
            record_error(f"{kind} gradients {dtype} vs reference at {dtype}", relative_error(g, s))
            if not low_precision_agrees(g, e, s, dtype):
                failures.append(
                    f"grad {name}: error {relative_error(g, s):.2e} against the {dtype} reference, {err:.2e} "
                    f"against float64 (the {dtype} reference's own: {relative_error(s, e):.2e})"
                )
    assert not failures, prefix + "; ".join(failures)
