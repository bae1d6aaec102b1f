// cem::attention and cem::attention_energy as composites of other ops (autograd flows
// through them): validate once, then dispatch to the backend kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"

namespace cem {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

at::Tensor attention(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const OptTensor& diag,
    const OptTensor& alibi_slopes, const OptTensor& precond_diag, const OptTensor& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale) {
  // Under symbolic tracing the kernel op's fake propagates the shapes, and the backend kernel
  // checks its arguments when the traced program runs.
  if (!has_symbolic_sizes(x)) {
    check_attention_args("cem::attention", x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  }
  if (computes_in_float32(x)) {
    // Autograd flows through the casts: the gradients come back in the inputs' dtype.
    return attention(x.to(at::kFloat), w_q.to(at::kFloat), w_k.to(at::kFloat), to_float(diag), to_float(alibi_slopes),
                     to_float(precond_diag), to_float(precond_lowrank), step_size.to(at::kFloat), scale)
        .to(x.scalar_type());
  }
  // Keep the per-step state only when a backward pass can follow: inference stays at O(B N D).
  const bool save = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w_q.requires_grad() || w_k.requires_grad() || requires_grad(diag) ||
                     requires_grad(precond_diag) || requires_grad(precond_lowrank) || step_size.requires_grad());
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("cem::attention_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                            std::optional<double>, bool)>();
  return std::get<0>(fwd.call(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, save));
}

// Dense scores, a block of query rows at a time so that memory stays O(rows * N) without
// autograd. A diagnostic op: it favours clarity over speed.
at::Tensor attention_energy(
    const at::Tensor& x, const at::Tensor& context, const at::Tensor& w_q, const at::Tensor& w_k,
    const OptTensor& diag, const OptTensor& alibi_slopes, std::optional<double> scale) {
  check_attention_energy_args("cem::attention_energy", x, context, w_q, w_k, diag, alibi_slopes, scale);
  const auto acc = accumulation_dtype(x.scalar_type());
  const int64_t batch = x.size(0), n = x.size(1), heads = w_q.size(0);
  const double beta = resolve_scale(scale, w_q.size(1));
  if (batch == 0 || n == 0) {
    return at::zeros({batch, n}, x.options());
  }
  const auto xa = x.to(acc);
  const auto c = context.to(acc);
  const auto q = at::einsum("bnd,hed->bhne", {xa, w_q.to(acc)});
  const auto keys_t = at::einsum("bnd,hed->bhne", {c, w_k.to(acc)}).transpose(-1, -2);
  const auto pos = at::arange(n, c.options());
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(n, (int64_t{1} << 24) / (batch * heads * n)));
  std::vector<at::Tensor> chunks;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t len = std::min(rows, n - r0);
    auto s = at::matmul(q.narrow(2, r0, len), keys_t);
    if (diag.has_value()) {
      const auto lam = diag->to(acc);
      const auto x_rows = xa.narrow(1, r0, len);
      s = lam.dim() == 1 ? s + at::matmul(x_rows * lam, c.transpose(-1, -2)).unsqueeze(1)
                         : s + at::einsum("bnd,hd,bmd->bhnm", {x_rows, lam, c});
    }
    s = s * beta;
    const auto distance = pos.narrow(0, r0, len).unsqueeze(1) - pos.unsqueeze(0);
    if (alibi_slopes.has_value()) {
      s = s - alibi_slopes->to(acc).view({heads, 1, 1}) * distance;
    }
    s = s.masked_fill(distance < 0, -std::numeric_limits<double>::infinity());
    chunks.push_back(at::logsumexp(s, {-1}).sum(1) * (-1.0 / beta));
  }
  return at::cat(chunks, 1).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CompositeImplicitAutograd, m) {
  m.impl("attention", &attention);
  m.impl("attention_energy", &attention_energy);
}

}  // namespace cem
