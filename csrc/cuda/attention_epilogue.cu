// The per-row update after each forward step (docs/backward.md, precision rule):
//   G = W_Q^T o + lambda * vbar,  PG = p * G + U (U^T G),  Delta += eta_t PG,
//   x^{t+1} = round(x^0 + Delta),  out = round(Delta).
// W_Q^T o, vbar and Z = U^T G come from cuBLAS in float32; this kernel fuses everything
// elementwise (the diagonal's lambda and the saved value term included), so that Delta is read
// and written once per step and no other pass over (B, N, D) is needed.
#include "cuda/attention_params.h"
#include "cuda/device_runtime.cuh"
#include "cuda/kernel_registry.h"
#include "cuda/tile_ops.cuh"

namespace cem::cuda {
namespace {

constexpr int kEpilogueThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads) attention_epilogue_kernel(const CemEpilogueParams p) {
  const int64_t row = blockIdx.x;
  const float eta = to_float(static_cast<const T*>(p.step_size)[p.step]);
  const float* g = p.g + row * p.dim;
  const float* z = p.z != nullptr ? p.z + row * p.rank : nullptr;
  const T* p_diag = static_cast<const T*>(p.p_diag);
  const T* x0 = static_cast<const T*>(p.x0) + row * p.dim;
  T* x_next = p.x_next != nullptr ? static_cast<T*>(p.x_next) + row * p.dim : nullptr;
  T* out = p.out != nullptr ? static_cast<T*>(p.out) + row * p.dim : nullptr;
  float* delta = p.delta + row * p.dim;
  const float* vbar = p.vbar != nullptr ? p.vbar + row * p.dim : nullptr;
  T* diag_out = p.diag_out != nullptr ? static_cast<T*>(p.diag_out) + row * p.dim : nullptr;
  for (int64_t d = threadIdx.x; d < p.dim; d += kEpilogueThreads) {
    float gd = g[d];
    if (vbar != nullptr) {
      const float value = p.lam != nullptr ? p.lam[d] * vbar[d] : vbar[d];
      gd += value;
      if (diag_out != nullptr) diag_out[d] = from_float<T>(value);
    }
    float pg = p_diag != nullptr ? gd * to_float(p_diag[d]) : gd;
    if (z != nullptr) {
      float low_rank = 0.f;
      for (int64_t r = 0; r < p.rank; ++r) {
        low_rank = fmaf(p.u_t[r * p.dim + d], z[r], low_rank);
      }
      pg += low_rank;
    }
    const float updated = delta[d] + eta * pg;
    delta[d] = updated;
    if (x_next != nullptr) {
      x_next[d] = from_float<T>(to_float(x0[d]) + updated);
    }
    if (out != nullptr) {
      out[d] = from_float<T>(updated);
    }
  }
}

template <typename T>
cudaError_t launch(const CemEpilogueParams& p, cudaStream_t stream) {
  return launch_kernel("attention_epilogue_kernel", attention_epilogue_kernel<T>, dim3(static_cast<unsigned int>(p.rows)),
                       dim3(kEpilogueThreads), 0, 0, stream, p);
}

}  // namespace

cudaError_t launch_attention_epilogue(CemDType dtype, const CemEpilogueParams& params, cudaStream_t stream) {
  switch (dtype) {
    case CemDType::kFloat32: return launch<float>(params, stream);
    case CemDType::kFloat16: return launch<__half>(params, stream);
    case CemDType::kBFloat16: return launch<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cem::cuda
