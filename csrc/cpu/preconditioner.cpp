#include "cpu/preconditioner.h"

#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace cem::cpu {

at::Tensor precondition(const at::Tensor& g, const Preconditioner& precond) {
  at::Tensor out = precond.diag.has_value() ? g * *precond.diag : g;
  if (precond.lowrank.has_value()) {
    out = out + at::matmul(at::matmul(g, *precond.lowrank), precond.lowrank->t());
  }
  return out;
}

at::Tensor step_backward(
    const at::Tensor& grad_next, const at::Tensor& neg_grad, double eta, int64_t step, const Preconditioner& precond,
    StepGradSums& sums) {
  const int64_t dim = neg_grad.size(-1);
  const auto a = grad_next.reshape({-1, dim});
  const auto g = neg_grad.reshape({-1, dim});
  sums.step_size[step] = (a * precondition(g, precond)).sum();
  const auto scaled = a * eta;  // d(P G)
  if (precond.diag.has_value()) {
    sums.precond_diag.add_((scaled * g).sum(0));
  }
  if (precond.lowrank.has_value()) {
    const auto& u = *precond.lowrank;
    sums.precond_lowrank.add_(at::matmul(scaled.t(), at::matmul(g, u)));
    sums.precond_lowrank.add_(at::matmul(g.t(), at::matmul(scaled, u)));
  }
  return precondition(scaled, precond).view(neg_grad.sizes());  // P is symmetric
}

StepGradSums zero_step_grad_sums(const Preconditioner& precond, int64_t steps, const at::Tensor& like) {
  StepGradSums sums;
  if (precond.diag.has_value()) sums.precond_diag = at::zeros_like(*precond.diag);
  if (precond.lowrank.has_value()) sums.precond_lowrank = at::zeros_like(*precond.lowrank);
  sums.step_size = at::zeros({steps}, like.options());
  return sums;
}

}  // namespace cem::cpu
