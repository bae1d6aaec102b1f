// CUDA implementations of cem::attention_fwd and cem::attention_bwd: validation, the dense
// projections and every D-wide product through ATen/cuBLAS, and the per-head attention kernels
// (csrc/cuda/attention_kernels.cuh) through the params struct. docs/backward.md is the blueprint;
// benchmarks/NOTES.md explains the design.
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
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cuda/kernel_registry.h"
#include "ops/checks.h"
#include "ops/saved_state.h"

namespace cem::cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;
using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, OptTensor, OptTensor, OptTensor, at::Tensor>;

constexpr int64_t kGridYZLimit = 65535;
constexpr int64_t kDefaultPanelBytes = int64_t{256} << 20;

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

void warn_fallback(const char* op, const std::string& why, at::ScalarType dtype) {
  if (dtype != at::kDouble) {  // float64 on CUDA is for gradcheck: expected, not worth a warning
    TORCH_WARN_ONCE(op, " (CUDA): ", why, "; running the reference implementation instead (slow, O(N^2) memory)");
  }
}

at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cem attention CUDA kernel '", what, "' failed to launch: ", cudaGetErrorString(err));
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
  cudaStream_t stream;

  bool has_diag() const { return s.diag_mode != DiagMode::kNone; }
  bool per_head() const { return s.diag_mode == DiagMode::kPerHead; }
};

void check_launch_limits(const char* op, const AttentionSizes& s) {
  TORCH_CHECK_VALUE(s.seq <= INT_MAX / 2, op, ": sequence length N = x.size(1) = ", s.seq, " is too long for the CUDA kernels");
  TORCH_CHECK_VALUE(s.batch <= kGridYZLimit, op, ": batch size B = x.size(0) = ", s.batch, " exceeds the CUDA grid limit ", kGridYZLimit);
  TORCH_CHECK_VALUE(s.heads <= kGridYZLimit, op, ": head count H = w_q.size(0) = ", s.heads, " exceeds the CUDA grid limit ", kGridYZLimit);
  TORCH_CHECK_VALUE(
      s.batch * s.seq <= INT_MAX, op, ": B * N = ", s.batch * s.seq, " rows exceed the CUDA grid limit ", INT_MAX);
}

void check_device_smem(const char* op, const AttentionKernelSet& set) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(
      set.smem_bytes <= limit, op, ": the CUDA kernels need ", set.smem_bytes,
      " bytes of shared memory per block but this device allows ", limit, " (they are built for sm_80 and sm_90)");
}

// Panel height: CEM_OPS_PANEL_ROWS if set (tests use it to cover multi-panel paths), else about
// N/8 rows (at least 256) within a fixed workspace budget. A panel of R rows computes its R x R_end
// GEMM rectangle, so the D-wide products cost about N^2/2 (1 + R/N): smaller panels waste less
// of the causal upper triangle, larger ones make bigger GEMMs.
int64_t choose_panel_rows(const AttentionSizes& s, at::ScalarType dtype, int tile) {
  const int64_t padded_n = (s.seq + tile - 1) / tile * tile;
  if (const char* env = std::getenv("CEM_OPS_PANEL_ROWS")) {
    char* end = nullptr;
    const long long rows = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && rows >= 1, "CEM_OPS_PANEL_ROWS must be a positive integer, got '", env, "'");
    return std::min(padded_n, (static_cast<int64_t>(rows) + tile - 1) / tile * tile);
  }
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t copies = s.diag_mode == DiagMode::kPerHead ? s.heads : 1;
  // Two float32 panels and two input-dtype panels of N keys, plus D-wide float32 temporaries.
  const int64_t per_row = s.batch * copies * (s.seq * (8 + 2 * elem) + s.dim * 12);
  const int64_t budget_rows = kDefaultPanelBytes / std::max<int64_t>(per_row, 1) / tile * tile;
  const int64_t target = (std::max<int64_t>(256, s.seq / 8) + tile - 1) / tile * tile;
  return std::clamp<int64_t>(std::min(target, budget_rows), tile, padded_n);
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
  st.stream = c10::cuda::getCurrentCUDAStream();  // launch on the caller's stream
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

// One forward step's attention core: lse, o and (with a diagonal) vbar = sum_k lambda_k P^k c.
void forward_core(const Setup& st, const at::Tensor& x_t, const at::Tensor& q, const at::Tensor& o, const at::Tensor& lse, at::Tensor& vbar) {
  const auto& s = st.s;
  auto p = base_params(st, q, o, lse);
  if (!st.has_diag()) {
    check_launch(st.kernels->fwd(p, st.stream), "attention_fwd");
    return;
  }
  for (int64_t r0 = 0; r0 < s.seq; r0 += st.panel_rows) {
    const int64_t r1 = std::min(s.seq, r0 + st.panel_rows);
    const int64_t rows = r1 - r0, keys = r1;
    const auto score_bias = diag_products(st, x_t.narrow(1, r0, rows), st.beta, keys);
    p.row_begin = static_cast<int>(r0);
    p.row_end = static_cast<int>(r1);
    p.score_bias = panel_view(score_bias, st.per_head());
    check_launch(st.kernels->fwd(p, st.stream), "attention_fwd");

    const auto probs = empty_panel(st, rows, keys);
    p.probs = panel_view(probs, st.per_head());
    p.probs_per_head = st.per_head();
    check_launch(st.kernels->tile_probs(p, st.stream), "attention_tile_probs");

    const auto context = st.x.narrow(1, 0, keys);
    auto vbar_rows = vbar.narrow(1, r0, rows);
    if (!st.per_head()) {
      vbar_rows.copy_(bmm_f32(probs, context).mul_(st.lam));
    } else {
      const auto pc = bmm_f32(probs.view({s.batch, s.heads * rows, keys}), context).view({s.batch, s.heads, rows, s.dim});
      vbar_rows.copy_((pc * st.lam.view({1, s.heads, 1, s.dim})).sum(1));
    }
  }
}

FwdResult attention_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const OptTensor& diag,
    const OptTensor& alibi_slopes, const OptTensor& precond_diag, const OptTensor& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale, bool save_for_backward) {
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

  const c10::cuda::CUDAGuard guard(x.device());
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
  auto delta = at::zeros({s.batch, s.seq, s.dim}, f32);
  auto vbar = st.has_diag() ? at::empty({s.batch, s.seq, s.dim}, f32) : at::Tensor();
  // Without save_for_backward the per-step state still has to live somewhere for one step.
  const auto o_scratch = save_for_backward ? at::Tensor() : at::empty({s.batch, s.seq, s.heads, s.head_dim}, st.x.options());
  const auto lse_scratch = save_for_backward ? at::Tensor() : at::empty({s.batch, s.heads, s.seq}, f32);

  at::Tensor x_t = st.x;
  for (int64_t t = 0; t < s.steps; ++t) {
    const auto q = at::matmul(x_t, st.wq.t());  // (B, N, H Dh)
    const auto o = save_for_backward ? state.head_outputs.select(0, t) : o_scratch;
    const auto lse = save_for_backward ? state.lse.select(0, t) : lse_scratch;
    forward_core(st, x_t, q, o, lse, vbar);

    auto g = mm_f32(o.view({rows, hd}), st.wq);  // G = sum_k W_Qk^T o^k, (B N, D) float32
    if (st.has_diag()) {
      g.add_(vbar.view({rows, s.dim}));
      if (save_for_backward) {
        state.diag_values.select(0, t).copy_(vbar);
      }
    }
    const auto z = u.defined() ? at::mm(g, u) : at::Tensor();  // U^T G, (B N, R)

    const bool last = t + 1 == s.steps;
    at::Tensor x_next;
    if (!last) {
      x_next = save_for_backward ? state.iterates.select(0, t) : at::empty_like(st.x);
    }
    CemEpilogueParams ep;
    ep.g = g.data_ptr<float>();
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
    check_launch(launch_attention_epilogue(*kernel_dtype(st.dtype), ep, st.stream), "attention_epilogue");
    if (!last) {
      x_t = x_next;
    }
  }
  return state.as_tuple();
}

// ---------------------------------------------------------------------------------------------
// Backward

void check_saved_state(
    const char* op, const AttentionSizes& s, const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& iterates,
    const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse) {
  auto check = [&](const char* name, const at::Tensor& t, std::vector<int64_t> shape, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(
        t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
        " (see docs/backward.md), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ", t.device());
  };
  const auto dtype = x.scalar_type();
  check("grad_out", grad_out, {s.batch, s.seq, s.dim}, dtype);
  check("iterates", iterates, {s.steps - 1, s.batch, s.seq, s.dim}, dtype);
  check("head_outputs", head_outputs, {s.steps, s.batch, s.seq, s.heads, s.head_dim}, dtype);
  if (s.diag_mode == DiagMode::kNone) {
    TORCH_CHECK_VALUE(diag_values.numel() == 0, op, ": diag_values must be empty without a diagonal, got shape ", diag_values.sizes());
  } else {
    check("diag_values", diag_values, {s.steps, s.batch, s.seq, s.dim}, dtype);
  }
  check("lse", lse, {s.steps, s.batch, s.heads, s.seq}, accumulation_dtype(dtype));
}

at::Tensor precondition(const at::Tensor& g, const at::Tensor& p_diag, const at::Tensor& u) {
  auto out = p_diag.defined() ? g * p_diag : g;
  if (u.defined()) {
    out = out + at::mm(at::mm(g, u), u.t());
  }
  return out;
}

// Accumulators of the backward pass (float32).
struct Grads {
  at::Tensor a;        // (B N, D): gradient of the current iterate
  at::Tensor dk;       // (B, N, H, Dh): dL/dK, over all steps
  at::Tensor wq;       // (H Dh, D)
  at::Tensor diag_f;   // shared: F = sum (beta dS^T x + P^T dG), (B, N, D); per head: sum_k lambda_k F^k
  at::Tensor diag;     // dL/dlambda, (D,) or (H, D)
};

// Backward of one step's attention core given dG; adds into g.a (scores' direct dx), g.dk,
// g.diag_f, g.diag; writes dq (B, N, H, Dh).
void backward_core(
    const Setup& st, const at::Tensor& x_t, const at::Tensor& q, const at::Tensor& o, const at::Tensor& dout,
    const at::Tensor& lse, const at::Tensor& grad_g, at::Tensor& delta, at::Tensor& dq, Grads& g) {
  const auto& s = st.s;
  auto p = base_params(st, q, o, lse);
  p.dout = head_view(dout, s);
  p.vec_loads = p.vec_loads && aligned16(dout);
  p.delta = delta.data_ptr<float>();
  p.dq = head_view(dq, s);
  p.dk = head_view(g.dk, s);
  if (!st.has_diag()) {
    check_launch(st.kernels->bwd_delta(p, st.stream), "attention_bwd_delta");
    check_launch(st.kernels->bwd_dk(p, st.stream), "attention_bwd_dk");
    check_launch(st.kernels->bwd_dq(p, st.stream), "attention_bwd_dq");
    return;
  }
  const auto grad_g_3d = grad_g.view({s.batch, s.seq, s.dim});
  const auto grad_g_t = grad_g_3d.to(st.dtype);
  auto a_3d = g.a.view({s.batch, s.seq, s.dim});
  for (int64_t r0 = 0; r0 < s.seq; r0 += st.panel_rows) {
    const int64_t r1 = std::min(s.seq, r0 + st.panel_rows);
    const int64_t rows = r1 - r0, keys = r1;
    const auto x_rows = x_t.narrow(1, r0, rows);
    const auto score_bias = diag_products(st, x_rows, st.beta, keys);
    const auto dp_bias = diag_products(st, grad_g_3d.narrow(1, r0, rows), 1.0, keys);  // y_i . c_j
    p.row_begin = static_cast<int>(r0);
    p.row_end = static_cast<int>(r1);
    p.score_bias = panel_view(score_bias, st.per_head());
    p.dp_bias = panel_view(dp_bias, st.per_head());
    check_launch(st.kernels->bwd_delta(p, st.stream), "attention_bwd_delta");

    const auto probs = empty_panel(st, rows, keys);
    const auto dprobs = empty_panel(st, rows, keys);
    p.probs = panel_view(probs, st.per_head());
    p.dprobs = panel_view(dprobs, st.per_head());
    p.probs_per_head = st.per_head();
    check_launch(st.kernels->tile_probs_grad(p, st.stream), "attention_tile_probs_grad");
    check_launch(st.kernels->bwd_dk(p, st.stream), "attention_bwd_dk");
    check_launch(st.kernels->bwd_dq(p, st.stream), "attention_bwd_dq");

    // D-wide terms (docs/backward.md step 4).
    const auto context = st.x.narrow(1, 0, keys);
    const auto grad_g_rows = grad_g_t.narrow(1, r0, rows);
    auto a_rows = a_3d.narrow(1, r0, rows);
    if (!st.per_head()) {
      a_rows.add_(bmm_f32(dprobs, context).mul_(st.lam * st.beta));  // dx += beta lambda * (dS c)
      g.diag_f.narrow(1, 0, keys)
          .add_(bmm_f32(dprobs.transpose(1, 2), x_rows), st.beta)
          .add_(bmm_f32(probs.transpose(1, 2), grad_g_rows));
      continue;
    }
    const auto context_f = context.to(at::kFloat);
    for (int64_t k = 0; k < s.heads; ++k) {
      const auto lam_k = st.lam.select(0, k);
      const auto ds_k = dprobs.select(1, k);
      const auto p_k = probs.select(1, k);
      a_rows.add_(bmm_f32(ds_k, context).mul_(lam_k * st.beta));
      auto f_k = bmm_f32(ds_k.transpose(1, 2), x_rows).mul_(st.beta).add_(bmm_f32(p_k.transpose(1, 2), grad_g_rows));
      g.diag_f.narrow(1, 0, keys).add_(f_k * lam_k);
      g.diag.select(0, k).add_((f_k * context_f).sum({0, 1}));
    }
  }
}

BwdResult attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const OptTensor& diag, const OptTensor& alibi_slopes, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, std::optional<double> scale,
    const at::Tensor& iterates, const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse) {
  constexpr const char* kOp = "cem::attention_bwd";
  const auto s = check_attention_args(kOp, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  check_saved_state(kOp, s, x, grad_out, iterates, head_outputs, diag_values, lse);
  std::string why;
  const auto* kernels = select_kernels(x.scalar_type(), s.head_dim, &why);
  if (kernels == nullptr) {
    warn_fallback(kOp, why, x.scalar_type());
    auto out = call_reference(
        kOp, grad_out, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, iterates,
        head_outputs, diag_values, lse);
    auto opt = [&](size_t i) { return out[i].isNone() ? OptTensor() : OptTensor(out[i].toTensor()); };
    return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor(), opt(3), opt(4), opt(5), out[6].toTensor()};
  }
  check_launch_limits(kOp, s);

  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);
  auto grad_wq = at::zeros({s.heads * s.head_dim, s.dim}, f32);
  auto grad_eta = at::zeros({s.steps}, f32);
  auto grad_p_diag = precond_diag.has_value() ? at::zeros({s.dim}, f32) : at::Tensor();
  auto grad_u = precond_lowrank.has_value() ? at::zeros({s.dim, s.rank}, f32) : at::Tensor();
  auto grad_lam = diag.has_value() ? at::zeros(diag->sizes(), f32) : at::Tensor();
  auto finish = [&](const at::Tensor& grad_x, const at::Tensor& grad_wk) -> BwdResult {
    auto opt = [&](const at::Tensor& t) { return t.defined() ? OptTensor(t.to(dtype)) : OptTensor(); };
    return {grad_x.to(dtype), grad_wq.view({s.heads, s.head_dim, s.dim}).to(dtype),
            grad_wk.view({s.heads, s.head_dim, s.dim}).to(dtype), opt(grad_lam), opt(grad_p_diag), opt(grad_u),
            grad_eta.to(dtype)};
  };
  if (s.batch == 0 || s.seq == 0) {
    return finish(at::zeros({s.batch, s.seq, s.dim}, f32), at::zeros({s.heads * s.head_dim, s.dim}, f32));
  }
  check_device_smem(kOp, *kernels);
  const Setup st = make_setup(s, kernels, x, w_q, w_k, diag, alibi_slopes, scale);
  const int64_t rows = s.batch * s.seq, hd = s.heads * s.head_dim;

  const auto eta = step_size.to(at::kFloat);
  const auto p_diag = precond_diag.has_value() ? precond_diag->to(at::kFloat) : at::Tensor();
  const auto u = precond_lowrank.has_value() ? precond_lowrank->to(at::kFloat) : at::Tensor();
  const auto grad_out_f = grad_out.to(at::kFloat).reshape({rows, s.dim});

  Grads g;
  g.a = grad_out_f.clone(at::MemoryFormat::Contiguous);  // a = dY: x^T enters Delta with sign +1
  g.dk = at::zeros({s.batch, s.seq, s.heads, s.head_dim}, f32);
  g.wq = grad_wq;
  g.diag_f = st.has_diag() ? at::zeros({s.batch, s.seq, s.dim}, f32) : at::Tensor();
  g.diag = grad_lam;
  auto dq = at::empty({s.batch, s.seq, s.heads, s.head_dim}, f32);
  auto delta = at::empty({s.batch, s.heads, s.seq}, f32);

  for (int64_t t = s.steps - 1; t >= 0; --t) {
    const auto x_t = t == 0 ? st.x : iterates.select(0, t - 1).contiguous();
    const auto x_t_2d = x_t.view({rows, s.dim});
    const auto o = head_outputs.select(0, t).contiguous();
    const auto o_2d = o.view({rows, hd});

    // Epilogue backward: x^{t+1} = x^t + eta_t P G^t.
    auto neg_grad = mm_f32(o_2d, st.wq);
    if (st.has_diag()) {
      neg_grad.add_(diag_values.select(0, t).reshape({rows, s.dim}));
    }
    grad_eta.select(0, t).copy_((g.a * precondition(neg_grad, p_diag, u)).sum());
    const auto scaled_a = g.a * eta.select(0, t);
    const auto grad_g = precondition(scaled_a, p_diag, u);  // P is symmetric
    if (p_diag.defined()) {
      grad_p_diag.add_((scaled_a * neg_grad).sum(0));
    }
    if (u.defined()) {
      grad_u.add_(at::mm(scaled_a.t(), at::mm(neg_grad, u))).add_(at::mm(neg_grad.t(), at::mm(scaled_a, u)));
    }

    // Value side: G = W_Q^T o + ..., so do = W_Q dG and dW_Q += o^T dG.
    const auto grad_g_t = grad_g.to(dtype);
    const auto dout = at::mm(grad_g_t, st.wq.t());  // (B N, H Dh)
    grad_wq.add_(mm_f32(o_2d.t(), grad_g_t));
    const auto q = at::mm(x_t_2d, st.wq.t());

    backward_core(st, x_t, q, o, dout, lse.select(0, t), grad_g, delta, dq, g);

    // Query side: q = W_Q x^t.
    const auto dq_t = dq.view({rows, hd}).to(dtype);
    grad_wq.add_(mm_f32(dq_t.t(), x_t_2d));
    g.a.add_(mm_f32(dq_t, st.wq));
  }

  // Keys and context never moved: dW_K = dK^T c, dc = W_K^T dK (+ diagonal terms).
  const auto dk_t = g.dk.view({rows, hd}).to(dtype);
  const auto grad_wk = mm_f32(dk_t.t(), st.x.view({rows, s.dim}));
  auto grad_x = g.a + mm_f32(dk_t, st.wk) - grad_out_f;
  if (st.has_diag()) {
    const auto diag_f = g.diag_f.view({rows, s.dim});
    if (st.per_head()) {
      grad_x.add_(diag_f);  // already sum_k lambda_k F^k, and d lambda accumulated per panel
    } else {
      grad_x.add_(diag_f * st.lam);
      grad_lam.add_((diag_f * st.x.view({rows, s.dim}).to(at::kFloat)).sum(0));
    }
  }
  return finish(grad_x.view({s.batch, s.seq, s.dim}), grad_wk);
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace cem::cuda
