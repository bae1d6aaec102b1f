// CUDA implementation of cem::attention_fwd: per step, the projections through ATen/cuBLAS, the
// attention core (per-head tile kernels, and the diagonal's row panels: attention_setup.h), then
// the fused epilogue kernel that applies the preconditioner and the step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/attention_setup.h"
#include "cuda/step_epilogue.h"
#include "ops/autocast_off.h"
#include "ops/saved_state.h"

namespace cem::cuda {
namespace {

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One forward step's attention core: lse, o and, with a diagonal, its value term into vbar:
// Pbar c for a shared diagonal (lambda is applied by the epilogue), sum_k lambda_k P^k c per head.
void forward_core(const Setup& st, const PanelWorkspace& panels, const at::Tensor& x_t, const at::Tensor& q,
                  const at::Tensor& o, const at::Tensor& lse, at::Tensor& vbar) {
  const auto& s = st.s;
  auto p = base_params(st, q, o, lse);
  if (!st.has_diag()) {
    check_launch(st, st.kernels->fwd(p, st.stream), "attention_fwd");
    return;
  }
  for (int64_t r0 = 0; r0 < s.seq; r0 += st.panel_rows) {
    const int64_t r1 = std::min(s.seq, r0 + st.panel_rows);
    const int64_t rows = r1 - r0, keys = r1;
    const auto score_bias = panels.view(0, rows, keys, st.per_head());
    diag_products(st, score_bias, x_t.narrow(1, r0, rows), st.beta, keys);
    const auto probs = panels.view(1, rows, keys, st.head_panels()).zero_();
    p.row_begin = static_cast<int>(r0);
    p.row_end = static_cast<int>(r1);
    p.score_bias = panel_view(score_bias, st.per_head());
    p.probs = panel_view(probs, st.head_panels());
    p.probs_per_head = st.head_panels();
    check_launch(st, st.kernels->fwd(p, st.stream), "attention_fwd");

    const auto context = st.x.narrow(1, 0, keys);
    const auto operand = panel_operand(st, probs);
    auto vbar_rows = vbar.narrow(1, r0, rows);
    if (!st.per_head()) {
      bmm_f32_into(vbar_rows, operand, context);
    } else {
      const auto pc = bmm_f32(operand.view({s.batch, s.heads * rows, keys}), context).view({s.batch, s.heads, rows, s.dim});
      vbar_rows.copy_((pc * st.lam.view({1, s.heads, 1, s.dim})).sum(1));
    }
  }
}

FwdResult attention_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const OptTensor& diag,
    const OptTensor& alibi_slopes, const OptTensor& precond_diag, const OptTensor& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale, bool save_for_backward) {
  const AutocastOff autocast_off;
  constexpr const char* kOp = "cem::attention_fwd";
  const auto s = check_attention_args(kOp, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  std::string why;
  const auto* kernels = select_kernels(x.scalar_type(), s.head_dim, &why);
  if (kernels == nullptr) {
    warn_fallback(kOp, why, x.scalar_type());
    auto out = call_reference(kOp, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, save_for_backward);
    return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor(), out[3].toTensor(), out[4].toTensor()};
  }
  check_launch_limits(kOp, s);

  const DeviceGuard guard(x.device());
  auto state = allocate_attention_state(x, s, save_for_backward);
  if (s.batch == 0 || s.seq == 0) {
    return state.as_tuple();
  }
  check_device_smem(kOp, *kernels);
  const Setup st = make_setup(s, kernels, x, w_q, w_k, diag, alibi_slopes, scale);
  const auto f32 = st.x.options().dtype(at::kFloat);
  const int64_t rows = s.batch * s.seq, hd = s.heads * s.head_dim;

  const StepEpilogue epilogue(precond_diag, precond_lowrank, step_size, st.lam, st.per_head());
  auto delta = at::zeros({s.batch, s.seq, s.dim}, f32);
  auto vbar = st.has_diag() ? at::empty({s.batch, s.seq, s.dim}, f32) : at::Tensor();
  const PanelWorkspace panels(st, st.has_diag() ? 2 : 0);
  // Without save_for_backward the per-step state still has to live somewhere for one step.
  const auto o_scratch = save_for_backward ? at::Tensor() : at::empty({s.batch, s.seq, s.heads, s.head_dim}, st.x.options());
  const auto lse_scratch = save_for_backward ? at::Tensor() : at::empty({s.batch, s.heads, s.seq}, f32);

  at::Tensor x_t = st.x;
  for (int64_t t = 0; t < s.steps; ++t) {
    const auto q = at::matmul(x_t, st.wq.t());  // (B, N, H Dh)
    const auto o = save_for_backward ? state.head_outputs.select(0, t) : o_scratch;
    const auto lse = save_for_backward ? state.lse.select(0, t) : lse_scratch;
    forward_core(st, panels, x_t, q, o, lse, vbar);

    const auto g = mm_f32(o.view({rows, hd}), st.wq);  // sum_k W_Qk^T o^k, (B N, D) float32
    const bool last = t + 1 == s.steps;
    at::Tensor x_next;
    if (!last) {
      x_next = save_for_backward ? state.iterates.select(0, t) : at::empty_like(st.x);
    }
    void* diag_out = st.has_diag() && save_for_backward ? state.diag_values.select(0, t).data_ptr() : nullptr;
    epilogue.apply(*kernel_dtype(st.dtype), st.stream, t, s.steps, g, vbar, diag_out, delta, st.x,
                   last ? nullptr : x_next.data_ptr(), state.out.data_ptr());
    if (!last) {
      x_t = x_next;
    }
  }
  return state.as_tuple();
}

}  // namespace

CEM_CUDA_LIBRARY_IMPL(m) { m.impl("attention_fwd", &attention_fwd_cuda); }

}  // namespace cem::cuda
