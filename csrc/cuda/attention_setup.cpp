#include "cuda/attention_setup.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <algorithm>
#include <climits>
#include <cstdlib>

namespace cem::cuda {
namespace {

constexpr int64_t kGridYZLimit = 65535;
constexpr int64_t kDefaultPanelBytes = int64_t{256} << 20;

// Panel height: CEM_OPS_PANEL_ROWS if set (tests use it to cover multi-panel paths), else about
// N/8 rows (at least 256) within a fixed workspace budget. A panel of R rows computes its R x R_end
// GEMM rectangle, so the D-wide products cost about N^2/2 (1 + R/N): smaller panels waste less
// of the causal upper triangle, larger ones make bigger GEMMs.
int64_t choose_panel_rows(const AttentionSizes& s, at::ScalarType dtype, int tile) {
  const int64_t padded_n = (s.seq + tile - 1) / tile * tile;
  const int64_t max_rows = kGridYZLimit * tile;  // a panel's query tiles are one launch's grid.y
  if (const char* env = std::getenv("CEM_OPS_PANEL_ROWS")) {
    char* end = nullptr;
    const long long rows = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && rows >= 1, "CEM_OPS_PANEL_ROWS must be a positive integer, got '", env, "'");
    return std::min({padded_n, max_rows, (static_cast<int64_t>(rows) + tile - 1) / tile * tile});
  }
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t copies = s.diag_mode == DiagMode::kPerHead ? s.heads : 1;
  // Two float32 panels and two input-dtype panels of N keys, plus D-wide float32 temporaries.
  const int64_t per_row = s.batch * copies * (s.seq * (8 + 2 * elem) + s.dim * 12);
  const int64_t budget_rows = kDefaultPanelBytes / std::max<int64_t>(per_row, 1) / tile * tile;
  const int64_t target = (std::max<int64_t>(256, s.seq / 8) + tile - 1) / tile * tile;
  return std::clamp<int64_t>(std::min({target, budget_rows, max_rows}), tile, padded_n);
}

}  // namespace

std::optional<CemDType> kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CemDType::kFloat32;
    case at::kHalf: return CemDType::kFloat16;
    case at::kBFloat16: return CemDType::kBFloat16;
    default: return std::nullopt;
  }
}

// The kernels for (dtype, head_dim), or null with the reason in *why.
const AttentionKernelSet* select_kernels(at::ScalarType dtype, int64_t head_dim, std::string* why) {
  const auto kdtype = kernel_dtype(dtype);
  if (!kdtype) {
    *why = std::string("dtype ") + c10::toString(dtype) + " has no CUDA kernel (float32, float16, bfloat16 do)";
    return nullptr;
  }
  const auto* set = head_dim <= INT_MAX ? find_attention_kernels(*kdtype, static_cast<int>(head_dim)) : nullptr;
  if (set == nullptr) {
    *why = "head dim Dh = w_q.size(1) = " + std::to_string(head_dim) + " with dtype " + c10::toString(dtype) +
           " has no compiled CUDA kernel (compiled: " + describe_attention_kernels() + ")";
  }
  return set;
}

void warn_fallback(const char* op, const std::string& why, at::ScalarType dtype) {
  if (dtype != at::kDouble) {  // float64 on CUDA is for gradcheck: expected, not worth a warning
    TORCH_WARN_ONCE(op, " (CUDA): ", why, "; running the reference implementation instead (slow, O(N^2) memory)");
  }
}

// Low-precision operands, float32 output: cuBLAS accumulates in float32 either way. The
// out_dtype overloads exist for CUDA tensors since torch 2.8; elsewhere (older torch, and the CPU
// tensors of the emulated backend) float32 copies of the operands give the same products.
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    return at::mm(a, b);
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.is_cuda()) {
    return at::mm(a, b, at::kFloat);
  }
#endif
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    return at::bmm(a, b);
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.is_cuda()) {
    return at::bmm(a, b, at::kFloat);
  }
#endif
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cem attention CUDA kernel '", what, "' failed: ", launch_error_text(err));
}

void check_launch_limits(const char* op, const AttentionSizes& s) {
  TORCH_CHECK_VALUE(s.seq <= INT_MAX / 2, op, ": sequence length N = x.size(1) = ", s.seq, " is too long for the CUDA kernels");
  TORCH_CHECK_VALUE(s.batch <= kGridYZLimit, op, ": batch size B = x.size(0) = ", s.batch, " exceeds the CUDA grid limit ", kGridYZLimit);
  TORCH_CHECK_VALUE(s.heads <= kGridYZLimit, op, ": head count H = w_q.size(0) = ", s.heads, " exceeds the CUDA grid limit ", kGridYZLimit);
  TORCH_CHECK_VALUE(
      s.batch * s.seq <= INT_MAX, op, ": B * N = ", s.batch * s.seq, " rows exceed the CUDA grid limit ", INT_MAX);
}

#ifndef CEM_CUDA_EMULATION
int max_dynamic_smem_optin() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}
#endif

void check_device_smem(const char* op, const AttentionKernelSet& set) {
  const int limit = max_dynamic_smem_optin();
  TORCH_CHECK(
      set.smem_bytes <= limit, op, ": the CUDA kernels need ", set.smem_bytes,
      " bytes of shared memory per block but this device allows ", limit, " (they are built for sm_80 and sm_90)");
}

Setup make_setup(
    const AttentionSizes& s, const AttentionKernelSet* kernels, const at::Tensor& x, const at::Tensor& w_q,
    const at::Tensor& w_k, const OptTensor& diag, const OptTensor& alibi_slopes, std::optional<double> scale) {
  Setup st{};
  st.s = s;
  st.dtype = x.scalar_type();
  st.kernels = kernels;
  st.x = x.contiguous();
  st.wq = w_q.contiguous().view({s.heads * s.head_dim, s.dim});
  st.wk = w_k.contiguous().view({s.heads * s.head_dim, s.dim});
  st.keys = at::matmul(st.x, st.wk.t());
  if (diag.has_value()) {
    st.lam = diag->to(at::kFloat).contiguous();
  }
  if (alibi_slopes.has_value()) {
    st.alibi = alibi_slopes->contiguous();
  }
  st.beta = static_cast<float>(resolve_scale(scale, s.head_dim));
  st.panel_rows = choose_panel_rows(s, st.dtype, kernels->tile_rows);
  st.stream = current_stream();  // launch on the caller's stream
  return st;
}

// A (B, N, H, Dh) tensor with unit stride along Dh, contiguous (every caller makes it so).
CemHeadTensor head_view(const at::Tensor& t, const AttentionSizes& s) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.numel() == s.batch * s.seq * s.heads * s.head_dim);
  CemHeadTensor h;
  h.ptr = t.data_ptr();
  h.batch_stride = s.seq * s.heads * s.head_dim;
  h.row_stride = s.heads * s.head_dim;
  h.head_stride = s.head_dim;
  return h;
}

// A (B, [H,] rows, keys) contiguous panel.
CemPanel panel_view(const at::Tensor& t, bool per_head) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  CemPanel p;
  p.ptr = t.data_ptr();
  p.batch_stride = t.stride(0);
  p.head_stride = per_head ? t.stride(1) : 0;
  p.row_stride = t.stride(-2);
  return p;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

CemAttnParams base_params(const Setup& st, const at::Tensor& q, const at::Tensor& o, const at::Tensor& lse) {
  const auto& s = st.s;
  CemAttnParams p;
  p.q = head_view(q, s);
  p.k = head_view(st.keys, s);
  p.o = head_view(o, s);
  p.lse = lse.data_ptr<float>();
  p.stat_batch_stride = s.heads * s.seq;
  p.stat_head_stride = s.seq;
  p.alibi_slopes = st.alibi.defined() ? st.alibi.data_ptr() : nullptr;
  p.batch = static_cast<int>(s.batch);
  p.seq = static_cast<int>(s.seq);
  p.heads = static_cast<int>(s.heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.row_begin = 0;
  p.row_end = static_cast<int>(s.seq);
  p.scale = st.beta;
  const bool vec_dims = (s.head_dim * static_cast<int64_t>(c10::elementSize(st.dtype))) % 16 == 0;
  p.vec_loads = vec_dims && aligned16(q) && aligned16(st.keys) && aligned16(o);
  return p;
}

// (alpha lambda_k * v_i) . c_j for the panel rows v (B, rows, D) and keys j < keys, float32:
// (B, rows, keys) for a shared diagonal, (B, H, rows, keys) per head. The scores' S^D (v = x^t,
// alpha = beta) and the backward's y . c (v = dG, alpha = 1).
at::Tensor diag_products(const Setup& st, const at::Tensor& v, double alpha, int64_t keys) {
  const auto& s = st.s;
  const int64_t rows = v.size(1);
  const auto context_t = st.x.narrow(1, 0, keys).transpose(1, 2);  // (B, D, keys)
  const auto lam = st.lam * alpha;
  if (!st.per_head()) {
    const auto scaled = (v.to(at::kFloat) * lam).to(st.dtype);
    return bmm_f32(scaled, context_t);
  }
  // Heads stacked as extra rows: one batched product, no broadcast copy of the context.
  const auto scaled = (v.to(at::kFloat).unsqueeze(1) * lam.view({1, s.heads, 1, s.dim}))
                          .to(st.dtype)
                          .reshape({s.batch, s.heads * rows, s.dim});
  return bmm_f32(scaled, context_t).view({s.batch, s.heads, rows, keys});
}

at::Tensor empty_panel(const Setup& st, int64_t rows, int64_t keys) {
  const auto opts = st.x.options();
  return st.per_head() ? at::empty({st.s.batch, st.s.heads, rows, keys}, opts) : at::empty({st.s.batch, rows, keys}, opts);
}

}  // namespace cem::cuda
