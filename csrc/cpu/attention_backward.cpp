// cem::attention_bwd on CPU: the reverse-step backward of docs/backward.md. Per step the
// dense parts (G^t from the saved o^t, the preconditioner epilogue, do = W_Q dG, the W_Q
// products) are tensor code; the attention core (attention_backward_block.h) recomputes the
// probabilities tile by tile from the saved x^t and lse. Key-side sums go to one buffer per
// chunk of work items and are added up once at the end (see AttnKeySums).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "cpu/attention_glue.h"
#include "cpu/preconditioner.h"
#include "ops/autocast_off.h"
#include "ops/emulated_op.h"
#include "ops/saved_state.h"

namespace cem::cpu {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, OptTensor, OptTensor, OptTensor, at::Tensor>;

OptTensor cast_like(const at::Tensor& grad, const OptTensor& like) {
  return like.has_value() ? OptTensor(grad.to(like->scalar_type())) : std::nullopt;
}

template <typename T>
Grads run_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_q, const AttentionSizes& s,
    const AttnCallTensors& call, const OptTensor& diag, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, double scale, const at::Tensor& iterates,
    const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse) {
  const auto acc = call.context.scalar_type();
  const auto opts = call.context.options();
  const int64_t hd = s.heads * s.head_dim;
  const bool has_diag = s.diag_mode != DiagMode::kNone;
  const Preconditioner precond{to_acc(precond_diag, acc), to_acc(precond_lowrank, acc)};
  StepGradSums step_sums = zero_step_grad_sums(precond, s.steps, call.context);
  const auto eta = host_step_sizes(step_size);
  const auto kernels = attention_core_kernels<T>();

  const int64_t chunks = chunk_count(s.batch, s.seq);
  const int64_t strips =
      strips_within_budget(backward_strip_count(diag_kind_of(s.diag_mode), s.heads), s.seq, sizeof(T));
  const int64_t workspace_size = backward_workspace_size(s.dim, s.heads, s.head_dim) + strip_elements(strips, s.seq);
  auto workspace = at::empty({chunks, workspace_size}, opts);
  auto key_grads = at::zeros({chunks, s.batch, s.seq, hd}, opts);
  auto context_grads = has_diag ? at::zeros({chunks, s.batch, s.seq, s.dim}, opts) : at::Tensor();
  auto diag_grads = has_diag ? at::zeros({chunks, call.diag->numel()}, opts) : at::Tensor();
  auto grad_queries = at::empty({s.batch, s.seq, hd}, opts);
  auto grad_x_scores = has_diag ? at::empty({s.batch, s.seq, s.dim}, opts) : at::Tensor();
  auto grad_w_q = at::zeros({hd, s.dim}, opts);

  const auto grad_out_acc = to_acc(grad_out, acc);
  at::Tensor grad_iterate = grad_out_acc;  // a = dL/dx^{t+1}, starting at x^T
  for (int64_t t = s.steps - 1; t >= 0; --t) {
    const auto x_t = t == 0 ? call.context : to_acc(iterates[t - 1], acc);
    const auto o = to_acc(head_outputs[t], acc).view({s.batch, s.seq, hd});
    auto neg_grad = at::matmul(o, call.w_q);
    if (has_diag) neg_grad = neg_grad + diag_values[t].to(acc);
    const auto grad_neg_grad = step_backward(grad_iterate, neg_grad, eta[t], t, precond, step_sums).contiguous();
    const auto grad_heads = at::matmul(grad_neg_grad, call.w_q.t()).contiguous();
    const auto queries = rounded_projection(x_t, call.w_q, call.storage, scale);  // pre-scaled by beta
    const auto lse_t = to_acc(lse[t], acc);

    AttnBwdParams<T> p{};
    p.in = core_inputs<T>(call, s, scale);
    p.x = x_t.data_ptr<T>();
    p.queries = queries.data_ptr<T>();
    p.head_outputs = o.data_ptr<T>();
    p.lse = lse_t.data_ptr<T>();
    p.grad_heads = grad_heads.data_ptr<T>();
    p.grad_neg_grad = grad_neg_grad.data_ptr<T>();
    p.strips = strips;
    p.grad_queries = grad_queries.data_ptr<T>();
    p.grad_x_scores = has_diag ? grad_x_scores.data_ptr<T>() : nullptr;
    T* workspace_base = workspace.data_ptr<T>();
    for_each_work_item(s.batch, s.seq, chunks, [&](int64_t chunk, int64_t b, int64_t query_block) {
      AttnKeySums<T> sums{};
      sums.grad_keys = key_grads[chunk].data_ptr<T>();
      if (has_diag) {
        sums.grad_context = context_grads[chunk].data_ptr<T>();
        sums.grad_diag = diag_grads[chunk].data_ptr<T>();
      }
      kernels.backward_block(p, sums, b, query_block, workspace_base + chunk * workspace_size);
    });

    // W_Q meets o (value side, G = W_Q^T o) and x^t (query side, q = W_Q x).
    const auto o_rows = o.view({-1, hd});
    const auto x_rows = x_t.view({-1, s.dim});
    grad_w_q.add_(at::matmul(o_rows.t(), grad_neg_grad.view({-1, s.dim})));
    grad_w_q.add_(at::matmul(grad_queries.view({-1, hd}).t(), x_rows));
    grad_iterate = grad_iterate + at::matmul(grad_queries, call.w_q);
    if (has_diag) grad_iterate = grad_iterate + grad_x_scores;
  }

  // Keys and context never moved: one reduction over the chunks for the whole pass.
  const auto grad_keys = key_grads.sum(0);
  auto grad_context = at::matmul(grad_keys, call.w_k);
  if (has_diag) grad_context = grad_context + context_grads.sum(0);
  const auto grad_w_k = at::matmul(grad_keys.view({-1, hd}).t(), call.context.view({-1, s.dim}));
  const auto grad_x = grad_iterate + grad_context - grad_out_acc;

  const auto dtype = x.scalar_type();
  const OptTensor grad_diag = has_diag ? OptTensor(diag_grads.sum(0).view(call.diag->sizes())) : std::nullopt;
  return Grads{
      grad_x.to(dtype),
      grad_w_q.view(w_q.sizes()).to(dtype),
      grad_w_k.view(w_q.sizes()).to(dtype),
      has_diag ? cast_like(*grad_diag, diag) : std::nullopt,
      precond_diag.has_value() ? cast_like(step_sums.precond_diag, precond_diag) : std::nullopt,
      precond_lowrank.has_value() ? cast_like(step_sums.precond_lowrank, precond_lowrank) : std::nullopt,
      step_sums.step_size.to(step_size.scalar_type()),
  };
}

Grads zero_grads(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const OptTensor& diag,
    const OptTensor& precond_diag, const OptTensor& precond_lowrank, const at::Tensor& step_size) {
  auto zeros_or_none = [](const OptTensor& t) {
    return t.has_value() ? OptTensor(at::zeros_like(*t, at::MemoryFormat::Contiguous)) : std::nullopt;
  };
  return Grads{
      at::zeros_like(x, at::MemoryFormat::Contiguous), at::zeros_like(w_q, at::MemoryFormat::Contiguous),
      at::zeros_like(w_k, at::MemoryFormat::Contiguous), zeros_or_none(diag), zeros_or_none(precond_diag),
      zeros_or_none(precond_lowrank), at::zeros_like(step_size, at::MemoryFormat::Contiguous)};
}

Grads attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const OptTensor& diag, const OptTensor& alibi_slopes, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, std::optional<double> scale,
    const at::Tensor& iterates, const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse) {
  if (cuda_emulation_enabled()) {
    static const auto emulated = emulated_op<decltype(attention_bwd_cpu)>("cem_emulated::attention_bwd");
    return emulated.call(grad_out, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale,
                         iterates, head_outputs, diag_values, lse);
  }
  const AutocastOff autocast_off;
  const AttentionSizes s = check_attention_args(
      "cem::attention_bwd", x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  check_attention_state("cem::attention_bwd", s, x, grad_out, iterates, head_outputs, diag_values, lse);
  if (s.batch == 0 || s.seq == 0) {
    return zero_grads(x, w_q, w_k, diag, precond_diag, precond_lowrank, step_size);  // no tokens: no gradient
  }
  const AttnCallTensors call = prepare_attention_call(x, w_q, w_k, diag, alibi_slopes, s);
  const double beta = resolve_scale(scale, s.head_dim);
  if (call.context.scalar_type() == at::kDouble) {
    return run_backward<double>(
        grad_out, x, w_q, s, call, diag, precond_diag, precond_lowrank, step_size, beta, iterates, head_outputs,
        diag_values, lse);
  }
  return run_backward<float>(
      grad_out, x, w_q, s, call, diag, precond_diag, precond_lowrank, step_size, beta, iterates, head_outputs,
      diag_values, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CPU, m) { m.impl("attention_bwd", &attention_bwd_cpu); }

}  // namespace cem::cpu
