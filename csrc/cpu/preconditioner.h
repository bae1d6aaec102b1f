// The preconditioner P g = p * g + U (U^T g) and the backward of one descent step
// x^{t+1} = x^t + eta P G, shared by the CPU attention and MLP ops (dense tensor code).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace cem::cpu {

// Tensors of P in the accumulation dtype; either part may be absent (p = 1, U = 0).
struct Preconditioner {
  std::optional<at::Tensor> diag;     // p, (D,)
  std::optional<at::Tensor> lowrank;  // U, (D, R)
};

// P g over the last dimension of g.
at::Tensor precondition(const at::Tensor& g, const Preconditioner& precond);

// Sums the gradients of a whole backward pass over its steps.
struct StepGradSums {
  at::Tensor precond_diag;     // (D,), undefined without p
  at::Tensor precond_lowrank;  // (D, R), undefined without U
  at::Tensor step_size;        // (T,)
};

// Backward of x^{t+1} = x^t + eta_t P G^t given a = dL/dx^{t+1} (flattened to rows of D):
// writes d eta_t = <a, P G>, adds d p and d U into `sums`, and returns dG = P (eta_t a).
at::Tensor step_backward(
    const at::Tensor& grad_next, const at::Tensor& neg_grad, double eta, int64_t step, const Preconditioner& precond,
    StepGradSums& sums);

// Zeroed sums for T steps, in the dtype and device of `like`.
StepGradSums zero_step_grad_sums(const Preconditioner& precond, int64_t steps, const at::Tensor& like);

}  // namespace cem::cpu
