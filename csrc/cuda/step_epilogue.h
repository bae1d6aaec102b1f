// The preconditioner and the step after each forward step, shared by cem::attention_fwd and
// cem::attention_cached: U^T G through cuBLAS, then the fused epilogue kernel
// (attention_epilogue.cu) that updates Delta and writes x^{t+1} or the output.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "cuda/host_runtime.h"
#include "cuda/kernel_registry.h"

namespace cem::cuda {

class StepEpilogue {
 public:
  // lam: the diagonal in float32 ((D,) or (H, D)), undefined without one.
  StepEpilogue(const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
               const at::Tensor& step_size, const at::Tensor& lam, bool per_head);

  // Step t of `steps`: G = g + (lambda *) vbar over `rows` rows of width D (both float32; vbar
  // undefined without a diagonal). Updates delta (float32) and writes x_next before the last
  // step, out on it; diag_out (or null) receives the diagonal's value term.
  void apply(CemDType dtype, cudaStream_t stream, int64_t t, int64_t steps, const at::Tensor& g, const at::Tensor& vbar,
             void* diag_out, at::Tensor& delta, const at::Tensor& x0, void* x_next, void* out) const;

 private:
  at::Tensor step_sizes_, p_diag_, u_, u_t_, u_vbar_, lam_;
  bool shared_diag_;
};

}  // namespace cem::cuda
