// CUDA implementation of cem::attention_fwd: per step, the projections through ATen/cuBLAS, the
// attention core (per-head tile kernels, and the diagonal's row panels: attention_setup.h), then
// the fused epilogue kernel that applies the preconditioner and the step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/attention_setup.h"
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

  const auto step_sizes = step_size.contiguous();
  const auto p_diag = precond_diag.has_value() ? precond_diag->contiguous() : at::Tensor();
  at::Tensor u, u_t;
  if (precond_lowrank.has_value()) {
    u = precond_lowrank->to(at::kFloat).contiguous();  // (D, R)
    u_t = u.t().contiguous();                          // (R, D): coalesced reads in the epilogue
  }
  const bool shared_diag = st.has_diag() && !st.per_head();
  // U^T G = U^T (W_Q^T o) + (lambda * U)^T vbar: the diagonal's lambda stays out of vbar.
  const auto u_vbar = u.defined() && st.has_diag() ? (shared_diag ? u * st.lam.unsqueeze(1) : u) : at::Tensor();
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
    at::Tensor z;  // U^T G, (B N, R)
    if (u.defined()) {
      z = at::mm(g, u);
      if (st.has_diag()) z.addmm_(vbar.view({rows, s.dim}), u_vbar);
    }

    const bool last = t + 1 == s.steps;
    at::Tensor x_next;
    if (!last) {
      x_next = save_for_backward ? state.iterates.select(0, t) : at::empty_like(st.x);
    }
    CemEpilogueParams ep;
    ep.g = g.data_ptr<float>();
    if (st.has_diag()) {
      ep.vbar = vbar.data_ptr<float>();
      ep.lam = shared_diag ? st.lam.data_ptr<float>() : nullptr;
      ep.diag_out = save_for_backward ? state.diag_values.select(0, t).data_ptr() : nullptr;
    }
    ep.z = z.defined() ? z.data_ptr<float>() : nullptr;
    ep.u_t = u_t.defined() ? u_t.data_ptr<float>() : nullptr;
    ep.p_diag = p_diag.defined() ? p_diag.data_ptr() : nullptr;
    ep.step_size = step_sizes.data_ptr();
    ep.step = static_cast<int>(t);
    ep.delta = delta.data_ptr<float>();
    ep.x0 = st.x.data_ptr();
    ep.x_next = last ? nullptr : x_next.data_ptr();
    ep.out = last ? state.out.data_ptr() : nullptr;
    ep.rows = rows;
    ep.dim = s.dim;
    ep.rank = s.rank;
    check_launch(st, launch_attention_epilogue(*kernel_dtype(st.dtype), ep, st.stream), "attention_epilogue");
    if (!last) {
      x_t = x_next;
    }
  }
  return state.as_tuple();
}

}  // namespace

CEM_CUDA_LIBRARY_IMPL(m) { m.impl("attention_fwd", &attention_fwd_cuda); }

}  // namespace cem::cuda
