"""Tolerances against the float64 reference (cem-math.md section 6) and the error measures
they apply to: relative errors ||out - ref|| / ||ref||."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative error bounds against the float64 reference, one place for every test.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


# A float32 gradient may be as far from the float64 reference as this factor times the error of
# the reference itself run in float32: some gradients, such as the step sizes', are cancelling
# sums whose float32 error exceeds the contract's 1e-4. FlashAttention's tests allow 2x; a kernel
# that sums in another, equally valid order reached 2.05x on an ill-conditioned random case
# (T = 4, found by hypothesis), so the margin is 3x.
REFERENCE_ERROR_FACTOR = 3.0


def error_bound(dtype: torch.dtype, reference_error: float = 0.0) -> float:
    """Largest acceptable relative error: the contract's tolerance, or REFERENCE_ERROR_FACTOR
    times the reference's own error at ``dtype`` when that is larger."""
    return max(TOLERANCES[dtype], REFERENCE_ERROR_FACTOR * reference_error)


def _noisy_copy(inputs, generator: torch.Generator, dtype: torch.dtype):
    """A float64 copy of ``inputs`` whose differentiable tensors carry relative noise of
    ``dtype``'s rounding size."""
    eps = torch.finfo(dtype).eps
    noisy = inputs.to(torch.float64)
    with torch.no_grad():
        for t in noisy.differentiable():
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device)
            t.mul_(1 + eps * noise)
    return noisy


def rounding_sensitivity(fn, inputs, grad_out: Tensor, expected, generator: torch.Generator,
                         dtype: torch.dtype = torch.float32, samples: int = 2) -> list[float]:
    """How far noise of ``dtype``'s rounding size on the inputs moves fn's float64 gradients
    (largest relative change over ``samples`` draws, per gradient): the error any ``dtype``
    implementation inherits from the conditioning, whatever order it sums in. A cancelling sum
    such as the step sizes' gradient can leave one valid implementation several times further
    from float64 than another; this measures the spread without depending on either's luck.

    ``inputs`` is an AttentionInputs/MLPInputs in float64; ``expected`` its float64 gradients."""
    worst = [0.0] * len(expected)
    for _ in range(samples):
        noisy = _noisy_copy(inputs, generator, dtype)
        leaves = noisy.differentiable()
        grads = torch.autograd.grad(fn(*noisy.requires_grad_().args()), leaves, grad_out)
        worst = [max(w, relative_error(g, e)) for w, g, e in zip(worst, grads, expected)]
    return worst


def output_rounding_sensitivity(fn, inputs, expected: Tensor, generator: torch.Generator,
                                dtype: torch.dtype, samples: int = 2) -> float:
    """rounding_sensitivity for fn's output: the largest relative change of the float64 output
    ``expected`` under input noise of ``dtype``'s rounding size."""
    with torch.no_grad():
        return max(relative_error(fn(*_noisy_copy(inputs, generator, dtype).args()), expected) for _ in range(samples))


def low_precision_agrees(got: Tensor, exact: Tensor, same_precision: Tensor, dtype: torch.dtype,
                         conditioning: float = 0.0) -> bool:
    """A bfloat16/float16 result is right when it is within the contract's tolerance of the
    reference run at the same precision, or when its error against float64 is within
    error_bound of the larger of that reference's own error and ``conditioning`` (the
    rounding_sensitivity at ``dtype``). Two valid low-precision implementations can round an
    iterate, or a tensor-core operand, to different neighbours; on ill-conditioned inputs that
    alone parts them by more than 1e-2, and exactly there the reference's own error or the
    conditioning is large too. A wrong result fails all three."""
    if relative_error(got, same_precision) < TOLERANCES[dtype]:
        return True
    return relative_error(got, exact) <= error_bound(dtype, max(relative_error(same_precision, exact), conditioning))


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are empty)."""
    if ref.numel() == 0:
        return 0.0
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()
