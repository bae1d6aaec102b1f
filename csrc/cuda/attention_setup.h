// Shared by the CUDA attention forward and backward glue: kernel selection, the reference
// fallback, the per-call Setup, the row panels of the diagonal and the params-struct views.
// docs/backward.md is the blueprint; benchmarks/NOTES.md explains the design.
//
// The shared diagonal's D-wide terms are done once for all heads, one row panel of R query rows
// at a time (memory O(R N), never N x N):
//   forward:  S^D = beta (lambda * x_i) . c_j   (cuBLAS, float32)  -> added to every head's scores
//             P = sum_k P^k                      (tile kernel, needs each head's lse first)
//             vbar = lambda * (P c)              (cuBLAS)
//   backward: YC = (lambda * dG_i) . c_j         (cuBLAS)           -> added to every head's dP
//             P, dS = sum_k P^k, sum_k dS^k      (tile kernel)
//             r = dS c, F += beta dS^T x + P^T dG (cuBLAS)
// A per-head diagonal uses per-head panels and per-head products (about H times the work).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/host_runtime.h"
#include "cuda/kernel_registry.h"
#include "ops/checks.h"

namespace cem::cuda {

using OptTensor = std::optional<at::Tensor>;

std::optional<CemDType> kernel_dtype(at::ScalarType dtype);

// The kernels for (dtype, head_dim), or null with the reason in *why.
const AttentionKernelSet* select_kernels(at::ScalarType dtype, int64_t head_dim, std::string* why);

// Runs the reference (the Python fallback registered at CompositeExplicitAutograd) for inputs the
// kernels do not cover: float64 (gradcheck) and head dims above the compiled buckets.
template <class... Args>
c10::Stack call_reference(const char* op, Args&&... args) {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
  TORCH_CHECK(
      handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd), op,
      ": these inputs need the reference implementation, which is registered by the cem_ops Python package; "
      "import cem_ops first");
  c10::Stack stack;
  stack.reserve(sizeof...(Args));
  (stack.emplace_back(std::forward<Args>(args)), ...);
  handle.callBoxedForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd, stack);
  return stack;
}

void warn_fallback(const char* op, const std::string& why, at::ScalarType dtype);

// Products with float32 output for input-dtype operands (cuBLAS accumulates in float32).
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b);
at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b);
// The same into a float32 destination, which may be a view (no temporary, no second pass):
// dst = beta dst + alpha a b; beta = 0 ignores what dst held.
void baddbmm_f32(at::Tensor dst, const at::Tensor& a, const at::Tensor& b, double beta, double alpha);
inline void bmm_f32_into(at::Tensor dst, const at::Tensor& a, const at::Tensor& b) { baddbmm_f32(dst, a, b, 0.0, 1.0); }
inline void add_bmm_f32(at::Tensor dst, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  baddbmm_f32(dst, a, b, 1.0, alpha);
}

// Everything a step needs that does not change between steps.
struct Setup {
  AttentionSizes s;
  at::ScalarType dtype;
  const AttentionKernelSet* kernels;
  at::Tensor x;           // (B, N, D) contiguous: x^0 and the context c
  at::Tensor wq, wk;      // (H Dh, D) contiguous
  at::Tensor keys;        // (B, N, H Dh): K = W_K c, once per call
  at::Tensor lam;         // float32 (D,) or (H, D); undefined without a diagonal
  at::Tensor alibi;       // (H,) contiguous or undefined
  float beta;
  int64_t panel_rows;     // query rows per diagonal panel (multiple of the tile size)
  bool deterministic;     // torch.use_deterministic_algorithms(True) or CEM_OPS_DETERMINISTIC=1
  cudaStream_t stream;

  bool has_diag() const { return s.diag_mode != DiagMode::kNone; }
  bool per_head() const { return s.diag_mode == DiagMode::kPerHead; }
  // Probability panels one slice per head: a per-head diagonal, or a shared one whose head sums
  // would otherwise be float atomics in an order that changes from run to run.
  bool head_panels() const { return per_head() || (has_diag() && deterministic && kernels->atomic_head_sums); }
  // dQ added by the main backward kernel with atomics, or written by bwd_dq (or by bwd itself).
  bool dq_atomic() const { return kernels->bwd_dq != nullptr && !deterministic; }
};

// A launch error, and with CEM_OPS_CUDA_SYNC=1 also an asynchronous fault of the kernel, which is
// then reported by the kernel that made it rather than by a later call.
void check_launch(const Setup& st, cudaError_t err, const char* what);
void check_launch(cudaStream_t stream, cudaError_t err, const char* what);

void check_launch_limits(const char* op, const AttentionSizes& s);
void check_device_smem(const char* op, const AttentionKernelSet& set);
Setup make_setup(
    const AttentionSizes& s, const AttentionKernelSet* kernels, const at::Tensor& x, const at::Tensor& w_q,
    const at::Tensor& w_k, const OptTensor& diag, const OptTensor& alibi_slopes, std::optional<double> scale);

// A (B, N, H, Dh) tensor with unit stride along Dh, contiguous (every caller makes it so).
CemHeadTensor head_view(const at::Tensor& t, const AttentionSizes& s);

// A (B, [H,] rows, keys) contiguous panel.
CemPanel panel_view(const at::Tensor& t, bool per_head);

bool aligned16(const at::Tensor& t);
CemAttnParams base_params(const Setup& st, const at::Tensor& q, const at::Tensor& o, const at::Tensor& lse);

// The float32 row panels of one call, allocated once at their largest and viewed per panel (the
// caching allocator then reuses one block instead of a growing series).
class PanelWorkspace {
 public:
  PanelWorkspace(const Setup& st, int count);
  // Panel `index` as (B, rows, keys), or (B, H, rows, keys) when `per_head`, contiguous.
  at::Tensor view(int index, int64_t rows, int64_t keys, bool per_head) const;

 private:
  const Setup& st_;
  std::vector<at::Tensor> buffers_;
};

// (alpha lambda_k * v_i) . c_j for the panel rows v (B, rows, D) and keys j < keys, into the
// float32 panel `dst`: (B, rows, keys) for a shared diagonal, (B, H, rows, keys) per head. The
// scores' S^D (v = x^t, alpha = beta) and the backward's y . c (v = dG, alpha = 1).
void diag_products(const Setup& st, at::Tensor dst, const at::Tensor& v, double alpha, int64_t keys);

// A probability panel as the D-wide products take it: summed over heads where the diagonal is
// shared but the panel has one slice per head, in the input dtype.
at::Tensor panel_operand(const Setup& st, const at::Tensor& panel);

// Whether the deterministic kernels are asked for.
bool deterministic_mode();

}  // namespace cem::cuda
