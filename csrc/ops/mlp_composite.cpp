// cem::mlp and cem::mlp_energy as composites of other ops (autograd flows through them).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace cem {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

at::Tensor mlp(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& v, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, c10::string_view activation) {
  const std::string act(activation);
  if (!has_symbolic_sizes(x)) {  // see cem::attention
    check_mlp_args("cem::mlp", x, w, v, precond_diag, precond_lowrank, step_size, act);
  }
  if (computes_in_float32(x)) {  // see cem::attention
    return mlp(x.to(at::kFloat), w.to(at::kFloat), v.to(at::kFloat), to_float(precond_diag), to_float(precond_lowrank),
               step_size.to(at::kFloat), activation)
        .to(x.scalar_type());
  }
  const bool save = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || v.requires_grad() || requires_grad(precond_diag) ||
                     requires_grad(precond_lowrank) || step_size.requires_grad());
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("cem::mlp_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const OptTensor&, const at::Tensor&, c10::string_view, bool)>();
  return std::get<0>(fwd.call(x, w, v, precond_diag, precond_lowrank, step_size, activation, save));
}

// Li2(-u) for u in [0, 1] by Landen's identity Li2(-u) = -Li2(u / (1 + u)) - log(1 + u)^2 / 2:
// the series sum w^k / k^2 has w <= 1/2 and converges geometrically.
at::Tensor dilog_of_minus(const at::Tensor& u) {
  const auto w = u / (u + 1);
  auto total = at::zeros_like(u);
  auto power = at::ones_like(u);
  for (int k = 1; k <= 60; ++k) {
    power = power * w;
    total = total + power / static_cast<double>(k * k);
  }
  return -total - at::log1p(u).pow(2) / 2;
}

// Phi with Phi' = phi and Phi(0) = 0.
at::Tensor antiderivative(const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kRelu:
      return at::relu(z).pow(2) / 2;
    case Activation::kGelu: {
      const auto cdf = (at::erf(z / std::sqrt(2.0)) + 1) * 0.5;
      const auto pdf = at::exp(-z * z / 2) / std::sqrt(2 * M_PI);
      return ((z * z - 1) * cdf + z * pdf) / 2 + 0.25;
    }
    case Activation::kSilu: {
      // Phi(z) = z softplus(z) + Li2(-e^z) + pi^2/12 for z <= 0; Phi(z) = z^2/2 - Phi(-z) for z > 0.
      const auto neg = -at::abs(z);
      const auto phi_neg = neg * at::softplus(neg) + dilog_of_minus(at::exp(neg)) + M_PI * M_PI / 12;
      return at::where(z > 0, z * z / 2 - phi_neg, phi_neg);
    }
  }
  TORCH_CHECK(false, "unreachable activation");
}

at::Tensor mlp_energy(
    const at::Tensor& x, const at::Tensor& context, const at::Tensor& w, const at::Tensor& v,
    c10::string_view activation) {
  const std::string act(activation);
  check_mlp_energy_args("cem::mlp_energy", x, context, w, v, act);
  const auto acc = accumulation_dtype(x.scalar_type());
  const auto gate = at::matmul(context.to(acc), v.to(acc).t());
  const auto phi = antiderivative(at::matmul(x.to(acc), w.to(acc).t()), parse_activation("cem::mlp_energy", act));
  return (-(gate * phi).sum(-1)).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CompositeImplicitAutograd, m) {
  m.impl("mlp", &mlp);
  m.impl("mlp_energy", &mlp_energy);
}

}  // namespace cem
