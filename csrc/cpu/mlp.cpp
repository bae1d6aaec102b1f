// cem::mlp_fwd and cem::mlp_bwd on CPU. The CEM MLP is element-wise per token, so it is dense
// tensor code (matmuls through BLAS): gate u = v c once per call, then per step
// G = w^T (phi(w x^t) * u) and Delta += eta P G; the backward follows docs/backward.md.
// Memory is O(B N (D + M)) per step.
#include <ATen/ops/erf.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/preconditioner.h"
#include "cpu/tensor_utils.h"
#include "ops/autocast_off.h"
#include "ops/checks.h"
#include "ops/saved_state.h"

namespace cem::cpu {
namespace {

using MlpGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, OptTensor, OptTensor, at::Tensor>;

at::Tensor activation(const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kSilu: return at::silu(z);
    case Activation::kGelu: return at::gelu(z);  // exact (erf) form
    case Activation::kRelu: return at::relu(z);
  }
  TORCH_CHECK(false, "unreachable activation");
}

at::Tensor activation_derivative(const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kSilu: {
      const auto sig = at::sigmoid(z);
      return sig * (1 + z * (1 - sig));
    }
    case Activation::kGelu: {
      const auto cdf = (at::erf(z * M_SQRT1_2) + 1) * 0.5;
      const auto pdf = at::exp(z * z * -0.5) * (1.0 / std::sqrt(2 * M_PI));
      return cdf + z * pdf;
    }
    case Activation::kRelu: return (z > 0).to(z.scalar_type());
  }
  TORCH_CHECK(false, "unreachable activation");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& v, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, c10::string_view activation_name,
    bool save_for_backward) {
  const AutocastOff autocast_off;
  const std::string name(activation_name);
  const MlpSizes s = check_mlp_args("cem::mlp_fwd", x, w, v, precond_diag, precond_lowrank, step_size, name);
  const Activation act = parse_activation("cem::mlp_fwd", name);
  MlpState state = allocate_mlp_state(x, s, save_for_backward);
  if (s.batch == 0 || s.seq == 0) {
    return state.as_tuple();
  }
  const auto acc = accumulation_dtype(x.scalar_type());
  const auto context = to_acc(x, acc);
  const auto w_acc = to_acc(w, acc);
  const auto gate = at::matmul(context, to_acc(v, acc).t());  // v c: the condition never moves
  const Preconditioner precond{to_acc(precond_diag, acc), to_acc(precond_lowrank, acc)};
  const auto eta = host_step_sizes(step_size);

  auto delta = at::zeros_like(context);
  at::Tensor x_t = context;
  for (int64_t t = 0; t < s.steps; ++t) {
    const auto neg_grad = at::matmul(activation(at::matmul(x_t, w_acc.t()), act) * gate, w_acc);
    delta.add_(precondition(neg_grad, precond), eta[t]);
    if (save_for_backward) state.neg_grads[t].copy_(neg_grad);
    if (t + 1 < s.steps) {
      const auto x_next = (context + delta).to(x.scalar_type());
      if (save_for_backward) state.iterates[t].copy_(x_next);
      x_t = to_acc(x_next, acc);
    }
  }
  state.out.copy_(delta);
  return state.as_tuple();
}

MlpGrads mlp_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& v,
    const OptTensor& precond_diag, const OptTensor& precond_lowrank, const at::Tensor& step_size,
    c10::string_view activation_name, const at::Tensor& iterates, const at::Tensor& neg_grads) {
  const AutocastOff autocast_off;
  const std::string name(activation_name);
  const MlpSizes s = check_mlp_args("cem::mlp_bwd", x, w, v, precond_diag, precond_lowrank, step_size, name);
  const Activation act = parse_activation("cem::mlp_bwd", name);
  check_mlp_state("cem::mlp_bwd", s, x, grad_out, iterates, neg_grads);
  auto zeros_or_none = [](const OptTensor& t) {
    return t.has_value() ? OptTensor(at::zeros_like(*t, at::MemoryFormat::Contiguous)) : std::nullopt;
  };
  if (s.batch == 0 || s.seq == 0) {
    return MlpGrads{
        at::zeros_like(x, at::MemoryFormat::Contiguous), at::zeros_like(w, at::MemoryFormat::Contiguous),
        at::zeros_like(v, at::MemoryFormat::Contiguous), zeros_or_none(precond_diag),
        zeros_or_none(precond_lowrank), at::zeros_like(step_size, at::MemoryFormat::Contiguous)};
  }
  const auto acc = accumulation_dtype(x.scalar_type());
  const auto context = to_acc(x, acc);
  const auto w_acc = to_acc(w, acc);
  const auto v_acc = to_acc(v, acc);
  const auto gate = at::matmul(context, v_acc.t());
  const Preconditioner precond{to_acc(precond_diag, acc), to_acc(precond_lowrank, acc)};
  StepGradSums step_sums = zero_step_grad_sums(precond, s.steps, context);
  const auto eta = host_step_sizes(step_size);

  const auto grad_out_acc = to_acc(grad_out, acc);
  at::Tensor grad_iterate = grad_out_acc;
  auto grad_gate = at::zeros_like(gate);
  auto grad_w = at::zeros_like(w_acc);
  for (int64_t t = s.steps - 1; t >= 0; --t) {
    const auto x_t = t == 0 ? context : to_acc(iterates[t - 1], acc);
    const auto grad_g = step_backward(grad_iterate, to_acc(neg_grads[t], acc), eta[t], t, precond, step_sums);
    const auto z = at::matmul(x_t, w_acc.t());
    const auto f = activation(z, act);
    const auto grad_h = at::matmul(grad_g, w_acc.t());
    const auto grad_z = grad_h * gate * activation_derivative(z, act);
    grad_gate.add_(grad_h * f);
    grad_w.add_(at::matmul((f * gate).reshape({-1, s.hidden}).t(), grad_g.reshape({-1, s.dim})));
    grad_w.add_(at::matmul(grad_z.reshape({-1, s.hidden}).t(), x_t.reshape({-1, s.dim})));
    grad_iterate = grad_iterate + at::matmul(grad_z, w_acc);
  }
  const auto grad_v = at::matmul(grad_gate.reshape({-1, s.hidden}).t(), context.reshape({-1, s.dim}));
  const auto grad_x = grad_iterate + at::matmul(grad_gate, v_acc) - grad_out_acc;
  auto cast_like = [](const at::Tensor& g, const OptTensor& like) {
    return like.has_value() ? OptTensor(g.to(like->scalar_type())) : std::nullopt;
  };
  return MlpGrads{
      grad_x.to(x.scalar_type()),
      grad_w.to(w.scalar_type()),
      grad_v.to(v.scalar_type()),
      cast_like(step_sums.precond_diag, precond_diag),
      cast_like(step_sums.precond_lowrank, precond_lowrank),
      step_sums.step_size.to(step_size.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CPU, m) {
  m.impl("mlp_fwd", &mlp_fwd_cpu);
  m.impl("mlp_bwd", &mlp_bwd_cpu);
}

}  // namespace cem::cpu
