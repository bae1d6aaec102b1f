#include "cuda/step_epilogue.h"

#include <ATen/ATen.h>

#include "cuda/attention_setup.h"

namespace cem::cuda {

StepEpilogue::StepEpilogue(const std::optional<at::Tensor>& precond_diag,
                           const std::optional<at::Tensor>& precond_lowrank, const at::Tensor& step_size,
                           const at::Tensor& lam, bool per_head)
    : step_sizes_(step_size.contiguous()), lam_(lam), shared_diag_(lam.defined() && !per_head) {
  if (precond_diag.has_value()) p_diag_ = precond_diag->contiguous();
  if (precond_lowrank.has_value()) {
    u_ = precond_lowrank->to(at::kFloat).contiguous();  // (D, R)
    u_t_ = u_.t().contiguous();                         // (R, D): coalesced reads in the epilogue
    // U^T G = U^T (W_Q^T o) + (lambda * U)^T vbar: the shared diagonal's lambda stays out of vbar.
    if (lam.defined()) u_vbar_ = shared_diag_ ? u_ * lam.unsqueeze(1) : u_;
  }
}

void StepEpilogue::apply(CemDType dtype, cudaStream_t stream, int64_t t, int64_t steps, const at::Tensor& g,
                         const at::Tensor& vbar, void* diag_out, at::Tensor& delta, const at::Tensor& x0, void* x_next,
                         void* out) const {
  const int64_t rows = g.size(0), dim = g.size(1);
  at::Tensor z;  // U^T G, (rows, R)
  if (u_.defined()) {
    z = at::mm(g, u_);
    if (vbar.defined()) z.addmm_(vbar.view({rows, dim}), u_vbar_);
  }
  const bool last = t + 1 == steps;
  CemEpilogueParams ep;
  ep.g = g.data_ptr<float>();
  if (vbar.defined()) {
    ep.vbar = vbar.data_ptr<float>();
    ep.lam = shared_diag_ ? lam_.data_ptr<float>() : nullptr;
    ep.diag_out = diag_out;
  }
  ep.z = z.defined() ? z.data_ptr<float>() : nullptr;
  ep.u_t = u_t_.defined() ? u_t_.data_ptr<float>() : nullptr;
  ep.p_diag = p_diag_.defined() ? p_diag_.data_ptr() : nullptr;
  ep.step_size = step_sizes_.data_ptr();
  ep.step = static_cast<int>(t);
  ep.delta = delta.data_ptr<float>();
  ep.x0 = x0.data_ptr();
  ep.x_next = last ? nullptr : x_next;
  ep.out = last ? out : nullptr;
  ep.rows = rows;
  ep.dim = dim;
  ep.rank = u_.defined() ? u_.size(1) : 0;
  check_launch(stream, launch_attention_epilogue(dtype, ep, stream), "attention_epilogue");
}

}  // namespace cem::cuda
