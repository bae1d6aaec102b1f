// cem::attention_fwd on CPU: validates, moves to the accumulation dtype, and runs the fused
// core (attention_forward_block.h) over (batch, query block) work items once per step. The
// iterate is rounded to the input dtype after each step (docs/backward.md, precision rule).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu/attention_glue.h"
#include "ops/autocast_off.h"
#include "ops/emulated_op.h"
#include "ops/saved_state.h"

namespace cem::cpu {
namespace {

template <typename T>
void run_forward(
    const at::Tensor& x, const AttentionSizes& s, const AttnCallTensors& call, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, double scale, bool save, AttentionState& state) {
  const auto acc = call.context.scalar_type();
  const bool staged = save && x.scalar_type() != acc;  // saved state in a narrower dtype: cast a copy
  const int64_t hd = s.heads * s.head_dim;
  const auto p_diag = to_acc(precond_diag, acc);
  const auto p_lowrank = to_acc(precond_lowrank, acc);
  const OptTensor p_lowrank_t =
      p_lowrank.has_value() ? OptTensor(p_lowrank->t().contiguous()) : std::nullopt;
  const auto eta = host_step_sizes(step_size);

  const int64_t chunks = chunk_count(s.batch, s.seq);
  const int64_t strips =
      strips_within_budget(forward_strip_count(diag_kind_of(s.diag_mode), s.heads), s.seq, sizeof(T));
  const int64_t workspace_size =
      forward_workspace_size(s.dim, s.heads, s.head_dim, s.rank) + strip_elements(strips, s.seq);
  auto workspace = at::empty({chunks, workspace_size}, call.context.options());
  auto delta = at::zeros({s.batch, s.seq, s.dim}, call.context.options());
  const bool has_diag = s.diag_mode != DiagMode::kNone;
  at::Tensor head_stage, diag_stage;
  if (staged) {
    head_stage = at::empty({s.batch, s.seq, hd}, call.context.options());
    if (has_diag) diag_stage = at::empty({s.batch, s.seq, s.dim}, call.context.options());
  }
  const auto kernels = attention_core_kernels<T>();

  at::Tensor x_t = call.context;
  for (int64_t t = 0; t < s.steps; ++t) {
    const auto queries = rounded_projection(x_t, call.w_q, call.storage, scale);  // pre-scaled by beta
    AttnFwdParams<T> p{};
    p.in = core_inputs<T>(call, s, scale);
    p.x = x_t.data_ptr<T>();
    p.queries = queries.data_ptr<T>();
    p.w_q = call.w_q.data_ptr<T>();
    p.precond_diag = data_or_null<T>(p_diag);
    p.precond_lowrank = data_or_null<T>(p_lowrank);
    p.precond_lowrank_t = data_or_null<T>(p_lowrank_t);
    p.rank = s.rank;
    p.step_size = static_cast<T>(eta[t]);
    p.strips = strips;
    p.delta = delta.data_ptr<T>();
    if (save) {
      p.head_outputs = staged ? head_stage.data_ptr<T>() : state.head_outputs[t].data_ptr<T>();
      if (has_diag) p.diag_values = staged ? diag_stage.data_ptr<T>() : state.diag_values[t].data_ptr<T>();
      p.lse = state.lse[t].data_ptr<T>();
    }
    T* workspace_base = workspace.data_ptr<T>();
    for_each_work_item(s.batch, s.seq, chunks, [&](int64_t chunk, int64_t b, int64_t query_block) {
      kernels.forward_block(p, b, query_block, workspace_base + chunk * workspace_size);
    });
    if (staged) {
      state.head_outputs[t].copy_(head_stage.view({s.batch, s.seq, s.heads, s.head_dim}));
      if (has_diag) state.diag_values[t].copy_(diag_stage);
    }
    if (t + 1 < s.steps) {
      const auto x_next = (call.context + delta).to(x.scalar_type());
      if (save) state.iterates[t].copy_(x_next);
      x_t = to_acc(x_next, acc);
    }
  }
  state.out.copy_(delta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const OptTensor& diag,
    const OptTensor& alibi_slopes, const OptTensor& precond_diag, const OptTensor& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale, bool save_for_backward) {
  if (cuda_emulation_enabled()) {
    static const auto emulated = emulated_op<decltype(attention_fwd_cpu)>("cem_emulated::attention_fwd");
    return emulated.call(x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale,
                         save_for_backward);
  }
  const AutocastOff autocast_off;
  const AttentionSizes s = check_attention_args(
      "cem::attention_fwd", x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  AttentionState state = allocate_attention_state(x, s, save_for_backward);
  if (s.batch == 0 || s.seq == 0) {
    return state.as_tuple();  // every tensor is empty
  }
  const AttnCallTensors call = prepare_attention_call(x, w_q, w_k, diag, alibi_slopes, s);
  const double beta = resolve_scale(scale, s.head_dim);
  if (call.context.scalar_type() == at::kDouble) {
    run_forward<double>(x, s, call, precond_diag, precond_lowrank, step_size, beta, save_for_backward, state);
  } else {
    run_forward<float>(x, s, call, precond_diag, precond_lowrank, step_size, beta, save_for_backward, state);
  }
  return state.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CPU, m) { m.impl("attention_fwd", &attention_fwd_cpu); }

}  // namespace cem::cpu
