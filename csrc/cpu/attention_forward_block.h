// Forward of one work item (batch b, query block): one step of CEM attention for its rows and
// the fused epilogue Delta += eta P G. Memory is a fixed set of tiles: nothing grows with N.
//
//   pass 1 (every mode): online softmax over the key blocks gives each head's lse and
//          o^k_i = sum_j p^k_ij k^k_j (rescaled as the running max grows, normalized at the end);
//   pass 2 (with a diagonal): take the scores again (from the strips of pass 1, or
//          recomputed), p = exp(s - lse), and accumulate
//          vbar_i = sum_g Pbar_g (lambda_g * c), where Pbar_g sums the normalized
//          probabilities of the heads sharing lambda_g. Pbar needs every head's final lse,
//          which is why this is a second pass rather than part of the first.
//   epilogue: G = W_Q^T o + vbar, P G = p * G + U (U^T G), Delta += eta P G.
#pragma once

#include "cpu/attention_tiles.h"

namespace cem::cpu::CEM_CPU_ISA {

template <typename T>
struct FwdTiles {
  T *run_max, *run_sum, *lse;  // (H, kQueryBlock)
  T *o;                        // (kQueryBlock, H * Dh)
  T *xl, *vbar, *g;            // (kQueryBlock, D): beta lambda * x, vbar, G
  T *s, *sd, *pbar;            // (kQueryBlock, kKeyBlock)
  T *lc;                       // (kKeyBlock, D)
  T *gu;                       // (kQueryBlock, R)
  T *iota;                     // (kKeyBlock)

  FwdTiles(T* workspace, int64_t dim, int64_t heads, int64_t head_dim, int64_t rank) {
    const int64_t q = kQueryBlock, k = kKeyBlock;
    Arena<T> a{workspace};
    run_max = a.take(heads * q), run_sum = a.take(heads * q), lse = a.take(heads * q);
    o = a.take(q * heads * head_dim);
    xl = a.take(q * dim), vbar = a.take(q * dim), g = a.take(q * dim);
    s = a.take(q * k), sd = a.take(q * k), pbar = a.take(q * k);
    lc = a.take(k * dim);
    gu = a.take(q * (rank > 0 ? rank : 1));
    iota = a.take(k);
  }
};

// Turns the score tile of head `head` into exp(s - m_new) and folds it into the running max
// and sum; rescales the head's o rows when the max grows.
template <typename T>
inline void online_softmax_update(
    T* s, T* run_max, T* run_sum, T* o_head, int64_t o_stride, int64_t head_dim, const Tile& t) {
  for (int64_t ii = 0; ii < t.rows; ++ii) {
    T* row = s + ii * t.cols;
    const int64_t n = t.valid(ii);
    if (n == 0) {
      std::fill(row, row + t.cols, T(0));
      continue;
    }
    const T m_old = run_max[ii];
    const T m_new = std::max(m_old, row_max(row, n));
    const T alpha = m_old == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(m_old - m_new);
    exp_shifted(row, row, n, m_new);
    std::fill(row + n, row + t.cols, T(0));
    run_sum[ii] = run_sum[ii] * alpha + row_sum(row, n);
    if (alpha != T(1)) scale_row(o_head + ii * o_stride, alpha, head_dim);
    run_max[ii] = m_new;
  }
}

template <typename T>
void attention_forward_block(const AttnFwdParams<T>& p, int64_t b, int64_t query_block, T* workspace) {
  const AttnCoreInputs<T>& in = p.in;
  const int64_t n = in.seq, dim = in.dim, heads = in.heads, head_dim = in.head_dim, hd = heads * head_dim;
  const int64_t i0 = query_block * kQueryBlock;
  const int64_t rows = std::min(kQueryBlock, n - i0);
  const ItemView<T> v{in, b, i0, rows, (i0 + rows - 1) / kKeyBlock + 1};  // causal: keys j <= i only
  FwdTiles<T> w(workspace, dim, heads, head_dim, p.rank);
  // Scores of head k kept from pass 1 (strip k), or null to recompute them in pass 2.
  const int64_t ld_strip = key_blocks_of(n) * kKeyBlock;
  T* strips = p.strips > 0 ? workspace + forward_workspace_size(dim, heads, head_dim, p.rank) : nullptr;
  auto head_strip = [&](int64_t k) { return strips + k * kQueryBlock * ld_strip; };
  const T* x_rows = p.x + (b * n + i0) * dim;
  const T* q_rows = p.queries + (b * n + i0) * hd;
  const bool has_diag = in.diag_kind != DiagKind::kNone;
  const bool per_head = in.diag_kind == DiagKind::kPerHead;

  for (int64_t jj = 0; jj < kKeyBlock; ++jj) w.iota[jj] = static_cast<T>(jj);
  std::fill(w.run_max, w.run_max + heads * kQueryBlock, -std::numeric_limits<T>::infinity());
  std::fill(w.run_sum, w.run_sum + heads * kQueryBlock, T(0));
  std::fill(w.o, w.o + rows * hd, T(0));
  if (in.diag_kind == DiagKind::kShared) scale_by_lambda(w.xl, x_rows, in.diag, in.scale, rows, dim);
  // The diagonal scores of a group: a per-head lambda is put on the query side per head.
  auto group_diag_scores = [&](const Tile& t, const T* lambda) {
    if (per_head) scale_by_lambda(w.xl, x_rows, lambda, in.scale, rows, dim);
    times_context(w.sd, w.xl, v, t);
  };

  // Pass 1: lse and o for every head.
  for (int64_t jb = 0; jb < v.key_blocks; ++jb) {
    const Tile t = v.tile(jb);
    for_each_head_group(in, [&](int64_t first, int64_t count, const T* lambda) {
      if (lambda != nullptr) group_diag_scores(t, lambda);
      for (int64_t k = first; k < first + count; ++k) {
        head_scores(w.s, v, k, q_rows, lambda != nullptr ? w.sd : nullptr, w.iota, t);
        if (strips != nullptr) store_to_strip(head_strip(k), ld_strip, w.s, t);
        online_softmax_update(
            w.s, w.run_max + k * kQueryBlock, w.run_sum + k * kQueryBlock, w.o + k * head_dim, hd, head_dim, t);
        gemm(rows, head_dim, t.cols, w.s, t.cols, v.key_rows(jb) + k * head_dim, hd, w.o + k * head_dim, hd, true);
      }
    });
  }
  for (int64_t k = 0; k < heads; ++k) {
    for (int64_t ii = 0; ii < rows; ++ii) {
      const T sum = w.run_sum[k * kQueryBlock + ii];
      scale_row(w.o + ii * hd + k * head_dim, T(1) / sum, head_dim);
      w.lse[k * kQueryBlock + ii] = w.run_max[k * kQueryBlock + ii] + std::log(sum);
    }
  }

  // Pass 2: vbar from the normalized probabilities summed over each head group.
  std::fill(w.vbar, w.vbar + rows * dim, T(0));
  if (has_diag) {
    for (int64_t jb = 0; jb < v.key_blocks; ++jb) {
      const Tile t = v.tile(jb);
      for_each_head_group(in, [&](int64_t first, int64_t count, const T* lambda) {
        if (strips == nullptr) group_diag_scores(t, lambda);
        if (count > 1) std::fill(w.pbar, w.pbar + rows * t.cols, T(0));
        for (int64_t k = first; k < first + count; ++k) {
          if (strips != nullptr) {
            probs_from_lse(w.s, head_strip(k) + t.j0, ld_strip, w.lse + k * kQueryBlock, t);
          } else {
            head_scores(w.s, v, k, q_rows, w.sd, w.iota, t);
            probs_from_lse(w.s, w.s, t.cols, w.lse + k * kQueryBlock, t);
          }
          if (count > 1) add_tile(w.pbar, w.s, t);
        }
        // Shared: accumulate Pbar c and apply lambda once below; per head: P^k (lambda_k c).
        if (per_head) pack_lambda_context(w.lc, v, lambda, t);
        const T* values = per_head ? w.lc : v.context_rows(jb);
        gemm(rows, dim, t.cols, count > 1 ? w.pbar : w.s, t.cols, values, dim, w.vbar, dim, true);
      });
    }
    if (!per_head) {
      for (int64_t ii = 0; ii < rows; ++ii)
        for (int64_t d = 0; d < dim; ++d) w.vbar[ii * dim + d] *= in.diag[d];
    }
  }

  // Epilogue: G = W_Q^T o + vbar, then Delta += eta P G.
  std::copy(w.vbar, w.vbar + rows * dim, w.g);
  gemm(rows, dim, hd, w.o, hd, p.w_q, dim, w.g, dim, true);
  T* delta_rows = p.delta + (b * n + i0) * dim;
  for (int64_t ii = 0; ii < rows; ++ii) {
    T* d_row = delta_rows + ii * dim;
    const T* g_row = w.g + ii * dim;
    if (p.precond_diag != nullptr) {
      for (int64_t d = 0; d < dim; ++d) d_row[d] += p.step_size * (p.precond_diag[d] * g_row[d]);
    } else {
      for (int64_t d = 0; d < dim; ++d) d_row[d] += p.step_size * g_row[d];
    }
  }
  if (p.precond_lowrank != nullptr) {
    gemm(rows, p.rank, dim, w.g, dim, p.precond_lowrank, p.rank, w.gu, p.rank, false);
    for (int64_t e = 0; e < rows * p.rank; ++e) w.gu[e] *= p.step_size;
    gemm(rows, dim, p.rank, w.gu, p.rank, p.precond_lowrank_t, dim, delta_rows, dim, true);
  }

  // Saved state for the backward pass.
  if (p.head_outputs != nullptr) std::copy(w.o, w.o + rows * hd, p.head_outputs + (b * n + i0) * hd);
  if (p.diag_values != nullptr) std::copy(w.vbar, w.vbar + rows * dim, p.diag_values + (b * n + i0) * dim);
  if (p.lse != nullptr) {
    for (int64_t k = 0; k < heads; ++k)
      std::copy(w.lse + k * kQueryBlock, w.lse + k * kQueryBlock + rows, p.lse + (b * heads + k) * n + i0);
  }
}

}  // namespace cem::cpu::CEM_CPU_ISA
