// cem::attention_cached on CPU: the chunk's rows against the cached context, in the accumulation
// dtype, entirely through ATen and BLAS: per step the projections and the preconditioner, and per
// batch row the attention core (scores, softmax, o = P K and the diagonal's P c) over exactly its
// own causal context, cache positions [0, length) and chunk rows up to itself. The cache is read
// in place (rows any stride apart).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/preconditioner.h"
#include "cpu/tensor_utils.h"
#include "ops/autocast_off.h"
#include "ops/checks.h"
#include "ops/emulated_op.h"

namespace cem::cpu {
namespace {

using CachedResult = std::tuple<at::Tensor, at::Tensor>;

// The context of one batch row: cache positions [0, n) and the chunk's C rows, each part a view
// of its storage (never copied): keys (H, ., Dh), context (., D) with a diagonal.
struct RowContext {
  int64_t cached;
  at::Tensor cache_keys, chunk_keys;
  at::Tensor cache_context, chunk_context;
};

// a (..., R, E) against both parts (., E) of the context: (..., R, L) scores.
at::Tensor against(const at::Tensor& a, const at::Tensor& cache_part, const at::Tensor& chunk_part) {
  return at::cat({at::matmul(a, cache_part.transpose(-1, -2)), at::matmul(a, chunk_part.transpose(-1, -2))}, -1);
}

// A (..., R, L) panel over both parts (., E) of the context: (..., R, E).
at::Tensor over(const at::Tensor& panel, int64_t cached, const at::Tensor& cache_part, const at::Tensor& chunk_part) {
  const int64_t last = panel.dim() - 1;
  return at::matmul(panel.narrow(last, 0, cached), cache_part) +
         at::matmul(panel.narrow(last, cached, panel.size(last) - cached), chunk_part);
}

// Rows [r0, r0 + rows) of one batch row in one step, through BLAS over exactly the row's context:
// o (rows, H, Dh) and the diagonal's value term (rows, D), lambda applied. A shared diagonal's
// score term and P-bar c are computed once for all heads. Scores are an (H, rows, L) panel.
void core_rows(const RowContext& c, const at::Tensor& q, const at::Tensor& x_t, const OptTensor& diag,
               const at::Tensor& slopes, double beta, int64_t r0, int64_t rows, at::Tensor o, at::Tensor value) {
  const auto qr = q.narrow(0, r0, rows).permute({1, 0, 2});  // (H, rows, Dh)
  auto s = against(qr, c.cache_keys, c.chunk_keys);          // (H, rows, L)
  const bool per_head = diag.has_value() && diag->dim() == 2;
  if (diag.has_value()) {
    const auto xr = x_t.narrow(0, r0, rows);
    const auto scaled = per_head ? xr.unsqueeze(0) * diag->unsqueeze(1) : xr * *diag;  // (H,) rows, D
    const auto diag_scores = against(scaled, c.cache_context, c.chunk_context);
    s = per_head ? s + diag_scores : s + diag_scores.unsqueeze(0);
  }
  s.mul_(beta);
  const int64_t keys = s.size(2);
  const auto positions = at::arange(c.cached + r0, c.cached + r0 + rows, s.options()).unsqueeze(1);
  const auto distance = positions - at::arange(keys, s.options()).unsqueeze(0);  // (rows, L): i - j
  if (slopes.defined()) s.sub_(slopes.view({-1, 1, 1}) * distance);
  s.masked_fill_((distance < 0).unsqueeze(0), -std::numeric_limits<double>::infinity());
  const auto probs = at::softmax(s, -1);
  o.copy_(over(probs, c.cached, c.cache_keys, c.chunk_keys).permute({1, 0, 2}));
  if (diag.has_value()) {
    value.copy_(per_head ? (over(probs, c.cached, c.cache_context, c.chunk_context) * diag->unsqueeze(1)).sum(0)
                         : over(probs.sum(0), c.cached, c.cache_context, c.chunk_context) * *diag);
  }
}

// Chunk rows per panel: (H, rows, L) scores of at most this many elements.
constexpr int64_t kPanelElements = int64_t{1} << 22;

CachedResult run_cached(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& cache_keys,
                        const OptTensor& cache_context, const at::Tensor& cache_lengths, const OptTensor& diag,
                        const OptTensor& alibi_slopes, const OptTensor& precond_diag, const OptTensor& precond_lowrank,
                        const at::Tensor& step_size, double beta, const CachedAttentionSizes& s) {
  const auto x0 = x.contiguous();
  const auto wq = w_q.reshape({s.heads * s.head_dim, s.dim});
  const auto keys = at::matmul(x0, w_k.reshape({s.heads * s.head_dim, s.dim}).t())
                        .view({s.batch, s.seq, s.heads, s.head_dim})
                        .contiguous();
  const auto lengths = cache_lengths.to(at::kCPU).contiguous();
  const int64_t* cached = lengths.data_ptr<int64_t>();
  const bool has_diag = diag.has_value();
  std::vector<RowContext> contexts(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) {
    auto& c = contexts[b];
    c.cached = cached[b];
    c.cache_keys = cache_keys[b].narrow(0, 0, c.cached).permute({1, 0, 2});
    c.chunk_keys = keys[b].permute({1, 0, 2});
    if (has_diag) {
      c.cache_context = (*cache_context)[b].narrow(0, 0, c.cached);
      c.chunk_context = x0[b];
    }
  }
  const auto slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  const auto eta = host_step_sizes(step_size);
  const Preconditioner precond{precond_diag, precond_lowrank};

  auto o = at::empty({s.batch, s.seq, s.heads, s.head_dim}, x0.options());
  auto value = has_diag ? at::empty({s.batch, s.seq, s.dim}, x0.options()) : at::Tensor();
  auto delta = at::zeros_like(x0);
  at::Tensor x_t = x0;
  for (int64_t t = 0; t < s.steps; ++t) {
    const auto q = at::matmul(x_t, wq.t()).view({s.batch, s.seq, s.heads, s.head_dim});
    // Batch rows in parallel, each with single-threaded BLAS inside; one row takes all threads.
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t context = contexts[b].cached + s.seq;
        const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(s.seq, kPanelElements / (s.heads * context)));
        for (int64_t r0 = 0; r0 < s.seq; r0 += rows) {
          const int64_t n = std::min(rows, s.seq - r0);
          core_rows(contexts[b], q[b], x_t[b], diag, slopes, beta, r0, n, o[b].narrow(0, r0, n),
                    has_diag ? value[b].narrow(0, r0, n) : at::Tensor());
        }
      }
    });
    auto g = at::matmul(o.view({s.batch, s.seq, s.heads * s.head_dim}), wq);
    if (has_diag) g = g + value;
    delta.add_(precondition(g, precond), eta[t]);
    if (t + 1 < s.steps) x_t = x0 + delta;
  }
  return {delta, keys};
}

CachedResult attention_cached_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
                                  const at::Tensor& cache_keys, const OptTensor& cache_context,
                                  const at::Tensor& cache_lengths, const OptTensor& diag, const OptTensor& alibi_slopes,
                                  const OptTensor& precond_diag, const OptTensor& precond_lowrank,
                                  const at::Tensor& step_size, std::optional<double> scale) {
  if (cuda_emulation_enabled()) {
    static const auto emulated = emulated_op<decltype(attention_cached_cpu)>("cem_emulated::attention_cached");
    return emulated.call(x, w_q, w_k, cache_keys, cache_context, cache_lengths, diag, alibi_slopes, precond_diag,
                         precond_lowrank, step_size, scale);
  }
  const AutocastOff autocast_off;
  constexpr const char* kOp = "cem::attention_cached";
  const auto s = check_attention_cached_args(kOp, x, w_q, w_k, cache_keys, cache_context, cache_lengths, diag,
                                             alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  const double beta = resolve_scale(scale, s.head_dim);
  if (s.batch == 0 || s.seq == 0) {
    return {at::zeros_like(x), at::empty({s.batch, s.seq, s.heads, s.head_dim}, x.options())};
  }
  // bfloat16/float16 run on float32 copies, as the other CPU ops do (computes_in_float32).
  const auto acc = accumulation_dtype(x.scalar_type());
  // The cache is cast as it is (a narrowed view stays a view when no cast is needed).
  const OptTensor context = cache_context.has_value() ? OptTensor(cache_context->to(acc)) : std::nullopt;
  auto [delta, keys] = run_cached(x.to(acc), w_q.to(acc), w_k.to(acc), cache_keys.to(acc), context, cache_lengths,
                                  to_acc(diag, acc), to_acc(alibi_slopes, acc), to_acc(precond_diag, acc),
                                  to_acc(precond_lowrank, acc), step_size, beta, s);
  return {delta.to(x.scalar_type()), keys.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cem, CPU, m) { m.impl("attention_cached", &attention_cached_cpu); }

}  // namespace cem::cpu
