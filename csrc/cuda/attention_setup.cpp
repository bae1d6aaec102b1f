#include "cuda/attention_setup.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

namespace cem::cuda {
namespace {

constexpr int64_t kGridYZLimit = 65535;
constexpr int64_t kDefaultPanelBytes = int64_t{256} << 20;

// Panel height: CEM_OPS_PANEL_ROWS if set (tests use it to cover multi-panel paths), else about
// N/8 rows (at least 256) within a fixed workspace budget, adjusted so that the forward kernel's
// blocks of a panel fill whole waves (SMs x resident blocks, from the occupancy API). A panel of
// R rows computes its R x R_end GEMM rectangle, so the D-wide products cost about
// N^2/2 (1 + R/N): smaller panels waste less of the causal upper triangle, larger ones make
// bigger GEMMs.
int64_t choose_panel_rows(const AttentionSizes& s, at::ScalarType dtype, const AttentionKernelSet& set, bool head_panels) {
  const int64_t tile = set.tile_rows;
  const int64_t padded_n = (s.seq + tile - 1) / tile * tile;
  const int64_t max_rows = kGridYZLimit * tile;  // a panel's query tiles are one launch's grid.y
  if (const char* env = std::getenv("CEM_OPS_PANEL_ROWS")) {
    char* end = nullptr;
    const long long rows = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && rows >= 1, "CEM_OPS_PANEL_ROWS must be a positive integer, got '", env, "'");
    // Clamped before rounding up to whole tiles: any value up to LLONG_MAX (strtoll's saturation)
    // means "one panel", without overflow.
    const int64_t capped = std::min<int64_t>({static_cast<int64_t>(rows), padded_n, max_rows});
    return (capped + tile - 1) / tile * tile;
  }
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t copies = head_panels ? s.heads : 1;
  // Four float32 panels (two biases, P and dS) and their input-dtype copies of N keys, plus D-wide
  // float32 temporaries.
  const int64_t per_row = s.batch * copies * (s.seq * (16 + 2 * elem) + s.dim * 12);
  const int64_t budget_tiles = std::max<int64_t>(1, kDefaultPanelBytes / std::max<int64_t>(per_row, 1) / tile);
  const int64_t target = std::clamp<int64_t>(
      std::min((std::max<int64_t>(256, s.seq / 8) + tile - 1) / tile, budget_tiles), 1, std::min(padded_n, max_rows) / tile);
  if (target * tile >= padded_n || set.fwd_blocks_per_sm == nullptr) {
    return target * tile;
  }
  // Whole waves: of the panel sizes from half to twice the target, the one whose blocks leave the
  // smallest partial last wave (the nearest to the target among equals).
  const int64_t wave = static_cast<int64_t>(multiprocessor_count()) * set.fwd_blocks_per_sm(true);
  const int64_t per_tile = s.batch * s.heads;
  auto efficiency = [&](int64_t tiles) {
    const int64_t blocks = tiles * per_tile;
    return static_cast<double>(blocks) / static_cast<double>((blocks + wave - 1) / wave * wave);
  };
  int64_t best = target;
  const int64_t most = std::min({2 * target, budget_tiles, std::min(padded_n, max_rows) / tile});
  for (int64_t tiles = std::max<int64_t>(1, target / 2); tiles <= most; ++tiles) {
    const double gain = efficiency(tiles) - efficiency(best);
    if (gain > 1e-9 || (gain > -1e-9 && std::abs(tiles - target) < std::abs(best - target))) {
      best = tiles;
    }
  }
  return best * tile;
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

// Once per distinct reason (op, dtype, head dim): each names a different missing kernel.
void warn_fallback(const char* op, const std::string& why, at::ScalarType dtype) {
  if (dtype == at::kDouble) {  // float64 on CUDA is for gradcheck: expected, not worth a warning
    return;
  }
  static std::mutex mutex;
  static std::set<std::string> warned;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!warned.insert(std::string(op) + why).second) {
      return;
    }
  }
  TORCH_WARN(op, " (CUDA): ", why, "; running the reference implementation instead (slow, O(N^2) memory)");
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

void baddbmm_f32(at::Tensor dst, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (a.scalar_type() == at::kFloat) {
    dst.baddbmm_(a, b, beta, alpha);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.is_cuda()) {
    at::baddbmm_out(dst, dst, a, b, at::kFloat, beta, alpha);
    return;
  }
#endif
  dst.baddbmm_(a.to(at::kFloat), b.to(at::kFloat), beta, alpha);
}

void check_launch(const Setup& st, cudaError_t err, const char* what) { check_launch(st.stream, err, what); }

void check_launch(cudaStream_t stream, cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cem attention CUDA kernel '", what, "' failed: ", launch_error_text(err));
  static const bool sync = [] {
    const char* env = std::getenv("CEM_OPS_CUDA_SYNC");
    return env != nullptr && std::string(env) == "1";
  }();
  if (sync) {
    err = synchronize_and_check(stream);
    TORCH_CHECK(err == cudaSuccess, "cem attention CUDA kernel '", what, "' faulted while running (CEM_OPS_CUDA_SYNC=1 "
                "checks after every launch): ", launch_error_text(err));
  }
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

int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
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
  st.deterministic = deterministic_mode();
  st.panel_rows = choose_panel_rows(s, st.dtype, *kernels, st.head_panels());
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

PanelWorkspace::PanelWorkspace(const Setup& st, int count) : st_(st) {
  const int64_t copies = st.head_panels() ? st.s.heads : 1;  // a per-head diagonal's biases too
  const int64_t elements = st.s.batch * copies * st.panel_rows * st.s.seq;
  for (int i = 0; i < count; ++i) {
    buffers_.push_back(at::empty({elements}, st.x.options().dtype(at::kFloat)));
  }
}

at::Tensor PanelWorkspace::view(int index, int64_t rows, int64_t keys, bool per_head) const {
  const auto& s = st_.s;
  const int64_t heads = per_head ? s.heads : 1;
  const auto panel = buffers_[index].narrow(0, 0, s.batch * heads * rows * keys);
  return per_head ? panel.view({s.batch, s.heads, rows, keys}) : panel.view({s.batch, rows, keys});
}

// (alpha lambda_k * v_i) . c_j for the panel rows v (B, rows, D) and keys j < keys, float32:
// (B, rows, keys) for a shared diagonal, (B, H, rows, keys) per head. The scores' S^D (v = x^t,
// alpha = beta) and the backward's y . c (v = dG, alpha = 1).
void diag_products(const Setup& st, at::Tensor dst, const at::Tensor& v, double alpha, int64_t keys) {
  const auto& s = st.s;
  const int64_t rows = v.size(1);
  const auto context_t = st.x.narrow(1, 0, keys).transpose(1, 2);  // (B, D, keys)
  const auto lam = st.lam * alpha;
  if (!st.per_head()) {
    bmm_f32_into(dst, (v.to(at::kFloat) * lam).to(st.dtype), context_t);
    return;
  }
  // Heads stacked as extra rows: one batched product, no broadcast copy of the context.
  const auto scaled = (v.to(at::kFloat).unsqueeze(1) * lam.view({1, s.heads, 1, s.dim}))
                          .to(st.dtype)
                          .reshape({s.batch, s.heads * rows, s.dim});
  bmm_f32_into(dst.view({s.batch, s.heads * rows, keys}), scaled, context_t);
}

at::Tensor panel_operand(const Setup& st, const at::Tensor& panel) {
  const auto summed = st.head_panels() && !st.per_head() ? panel.sum(1) : panel;
  return summed.to(st.dtype);
}

bool deterministic_mode() {
  const char* env = std::getenv("CEM_OPS_DETERMINISTIC");
  const bool forced = env != nullptr && std::string(env) == "1";
  return forced || at::globalContext().deterministicAlgorithms();
}

}  // namespace cem::cuda
