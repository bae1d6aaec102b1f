"""The one correctness policy every backend is held to: an op's output and gradients against the
float64 reference on the same (rounded) inputs.

  output: within TOLERANCES[dtype] of float64 (1e-4 float32, 1e-2 bfloat16/float16); a
          bfloat16/float16 output beyond that is held to the gradients' rule below;
  gradients: within error_bound of the larger of the same-precision reference's own error and
           the conditioning (rounding_sensitivity: what input noise of the dtype's rounding size
           does to the float64 gradients); bfloat16/float16 gradients also pass when within 1e-2
           of the reference forward + explicit backward run at their precision.

The output needs the low-precision rule on ill-conditioned cases: at D = 4096 with a shared
diagonal and T = 2, bfloat16-size noise on the inputs moves the float64 output by 4-9%, and the
CUDA kernels' bfloat16 operands of the D-wide products (lambda * x and Pbar) alone put a valid
result at 1.0-1.2e-2. The conditioning term matters for cancelling sums such as the step-size gradient, one scalar per
step: there any implementation's rounding points (the CUDA kernels round P and dS to the input
dtype for the tensor cores, the reference keeps them in float32) can put valid results several
times the reference's own error apart. It is measured only for gradients that need it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import reference
from .tolerances import (
    TOLERANCES,
    error_bound,
    low_precision_agrees,
    output_rounding_sensitivity,
    relative_error,
    rounding_sensitivity,
)

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
    if dtype in (F64, torch.float32) or err < TOLERANCES[dtype]:
        assert err < TOLERANCES[dtype], f"{prefix}output: error {err:.2e}, bound {TOLERANCES[dtype]:.0e}"
    else:
        with torch.no_grad():
            same_out = reference_fn(*inputs.to(dtype).args())
        noise = output_rounding_sensitivity(reference_fn, inputs, want, generator, dtype)
        bound = error_bound(dtype, max(relative_error(same_out, want), noise))
        assert low_precision_agrees(out, want, same_out, dtype, noise), (
            f"{prefix}output: error {err:.2e} against float64, bound {bound:.2e} "
            f"(and {relative_error(out, same_out):.2e} against the {dtype} reference)")

    same_precision = expected
    if dtype == torch.float32:
        _, same_precision = output_and_gradients(reference_fn, inputs, dtype, grad_out)
    elif dtype != F64:
        same_precision = _explicit_gradients(kind, inputs.to(dtype), grad_out)
    names = inputs.differentiable_names()
    for name, g, e, s in zip(names, got, expected, same_precision):
        assert g.dtype == dtype and g.shape == e.shape, f"{prefix}grad {name}: {g.dtype} {tuple(g.shape)}"
        record_error(f"{kind} gradients {dtype} vs float64", relative_error(g, e))
        if dtype not in (F64, torch.float32):
            record_error(f"{kind} gradients {dtype} vs reference at {dtype}", relative_error(g, s))

    def agrees(g, e, s, conditioning: float) -> bool:
        if dtype in (F64, torch.float32):
            return relative_error(g, e) < error_bound(dtype, max(relative_error(s, e), conditioning))
        return low_precision_agrees(g, e, s, dtype, conditioning)

    # The conditioning (rounding_sensitivity) costs two more reference runs: only measured for
    # gradients that do not agree without it.
    pending = [i for i, (g, e, s) in enumerate(zip(got, expected, same_precision)) if not agrees(g, e, s, 0.0)]
    failures = []
    if pending:
        sensitivity = rounding_sensitivity(reference_fn, inputs, grad_out, expected, generator, dtype=dtype)
        for i in pending:
            g, e, s, noise = got[i], expected[i], same_precision[i], sensitivity[i]
            if agrees(g, e, s, noise):
                continue
            bound = error_bound(dtype, max(relative_error(s, e), noise))
            detail = f"grad {names[i]}: error {relative_error(g, e):.2e} against float64, bound {bound:.2e}"
            if dtype not in (F64, torch.float32):
                detail += f" (and {relative_error(g, s):.2e} against the {dtype} reference)"
            failures.append(detail)
    assert not failures, prefix + "; ".join(failures)
