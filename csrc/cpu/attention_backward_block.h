// Backward of one work item (batch b, query block) for one step, given dG and do = W_Q dG
// (docs/backward.md, steps 3-4). Probabilities are recomputed from the saved x^t and lse
// (once per query block: pass 1 keeps them in strips for pass 2 when the budget allows).
//
//   Delta^k_i = do^k_i . o^k_i + sum_j p^k_ij (y_i . c_j),  y = lambda * dG
//   pass 1 (with a diagonal): the second term, which needs every key of the row;
//   pass 2: ds = p (do . k + y . c - Delta) and its products:
//       query side (owned by this item):  dq += ds k,  r += dSbar (lambda * c)
//       key side (summed per chunk):      dk += ds^T (beta q) + p^T do,
//                                         z = dSbar^T (beta x) + Pbar^T dG,
//                                         dc += lambda * z,  dlambda += c * z
//   With a shared diagonal only the head sums Pbar and dSbar meet the D-wide terms, so that
//   work is done once per key block for all heads.
#pragma once

#include "cpu/attention_tiles.h"

namespace cem::cpu::CEM_CPU_ISA {

template <typename T>
struct BwdTiles {
  T *delta;                            // (H, kQueryBlock)
  T *dq;                               // (kQueryBlock, H * Dh)
  T *xs, *xl, *y, *r;                  // (kQueryBlock, D): beta x, beta lambda * x, lambda * dG, r
  T *s, *ds, *sd, *yc, *pbar, *dsbar;  // (kQueryBlock, kKeyBlock)
  T *lc, *z;                           // (kKeyBlock, D)
  T *iota;                             // (kKeyBlock)

  BwdTiles(T* workspace, int64_t dim, int64_t heads, int64_t head_dim) {
    const int64_t q = kQueryBlock, k = kKeyBlock;
    Arena<T> a{workspace};
    delta = a.take(heads * q);
    dq = a.take(q * heads * head_dim);
    xs = a.take(q * dim), xl = a.take(q * dim), y = a.take(q * dim), r = a.take(q * dim);
    s = a.take(q * k), ds = a.take(q * k), sd = a.take(q * k), yc = a.take(q * k);
    pbar = a.take(q * k), dsbar = a.take(q * k);
    lc = a.take(k * dim), z = a.take(k * dim);
    iota = a.take(k);
  }
};

template <typename T>
void attention_backward_block(
    const AttnBwdParams<T>& p, const AttnKeySums<T>& sums, int64_t b, int64_t query_block, T* workspace) {
  const AttnCoreInputs<T>& in = p.in;
  const int64_t n = in.seq, dim = in.dim, heads = in.heads, head_dim = in.head_dim, hd = heads * head_dim;
  const int64_t i0 = query_block * kQueryBlock;
  const int64_t rows = std::min(kQueryBlock, n - i0);
  const ItemView<T> v{in, b, i0, rows, (i0 + rows - 1) / kKeyBlock + 1};
  BwdTiles<T> w(workspace, dim, heads, head_dim);
  // Pass 1 keeps P^k (strip k) and each group's y.c (strip H + g) for pass 2, or null.
  const int64_t ld_strip = key_blocks_of(n) * kKeyBlock;
  T* strips = p.strips > 0 ? workspace + backward_workspace_size(dim, heads, head_dim) : nullptr;
  auto prob_strip = [&](int64_t k) { return strips + k * kQueryBlock * ld_strip; };
  auto yc_strip = [&](const T* lambda) {
    return strips + (heads + (lambda - in.diag) / dim) * kQueryBlock * ld_strip;  // group index from lambda
  };
  const T* x_rows = p.x + (b * n + i0) * dim;
  const T* q_rows = p.queries + (b * n + i0) * hd;
  const T* o_rows = p.head_outputs + (b * n + i0) * hd;
  const T* do_rows = p.grad_heads + (b * n + i0) * hd;
  const T* dg_rows = p.grad_neg_grad + (b * n + i0) * dim;
  const bool has_diag = in.diag_kind != DiagKind::kNone;
  const bool per_head = in.diag_kind == DiagKind::kPerHead;
  auto lse_rows = [&](int64_t k) { return p.lse + (b * heads + k) * n + i0; };

  for (int64_t jj = 0; jj < kKeyBlock; ++jj) w.iota[jj] = static_cast<T>(jj);
  for (int64_t k = 0; k < heads; ++k)
    for (int64_t ii = 0; ii < rows; ++ii)
      w.delta[k * kQueryBlock + ii] = dot(do_rows + ii * hd + k * head_dim, o_rows + ii * hd + k * head_dim, head_dim);
  std::fill(w.dq, w.dq + rows * hd, T(0));
  if (has_diag) {
    for (int64_t e = 0; e < rows * dim; ++e) w.xs[e] = in.scale * x_rows[e];
    std::fill(w.r, w.r + rows * dim, T(0));
  }
  if (in.diag_kind == DiagKind::kShared) {
    scale_by_lambda(w.xl, x_rows, in.diag, in.scale, rows, dim);
    scale_by_lambda(w.y, dg_rows, in.diag, T(1), rows, dim);
  }
  // Diagonal scores and y . c of a group; a per-head lambda goes on the query side per head.
  auto group_diag_terms = [&](const Tile& t, const T* lambda) {
    if (per_head) {
      scale_by_lambda(w.xl, x_rows, lambda, in.scale, rows, dim);
      scale_by_lambda(w.y, dg_rows, lambda, T(1), rows, dim);
    }
    times_context(w.sd, w.xl, v, t);
    times_context(w.yc, w.y, v, t);
  };

  // Pass 1: Delta^k_i += sum_j p^k_ij (y_i . c_j), with y . c once per group.
  if (has_diag) {
    for (int64_t jb = 0; jb < v.key_blocks; ++jb) {
      const Tile t = v.tile(jb);
      for_each_head_group(in, [&](int64_t first, int64_t count, const T* lambda) {
        group_diag_terms(t, lambda);
        if (strips != nullptr) store_to_strip(yc_strip(lambda), ld_strip, w.yc, t);
        for (int64_t k = first; k < first + count; ++k) {
          head_scores(w.s, v, k, q_rows, w.sd, w.iota, t);
          probs_from_lse(w.s, w.s, t.cols, lse_rows(k), t);
          if (strips != nullptr) store_to_strip(prob_strip(k), ld_strip, w.s, t);
          for (int64_t ii = 0; ii < rows; ++ii)
            w.delta[k * kQueryBlock + ii] += dot(w.s + ii * t.cols, w.yc + ii * t.cols, t.cols);
        }
      });
    }
  }

  // Pass 2: dS and every product of it.
  for (int64_t jb = 0; jb < v.key_blocks; ++jb) {
    const Tile t = v.tile(jb);
    T* dk_rows = sums.grad_keys + (b * n + t.j0) * hd;
    for_each_head_group(in, [&](int64_t first, int64_t count, const T* lambda) {
      if (lambda != nullptr) {
        if (strips != nullptr) {
          load_from_strip(w.yc, yc_strip(lambda), ld_strip, t);
        } else {
          group_diag_terms(t, lambda);
        }
        if (count > 1) {
          std::fill(w.pbar, w.pbar + rows * t.cols, T(0));
          std::fill(w.dsbar, w.dsbar + rows * t.cols, T(0));
        }
      }
      for (int64_t k = first; k < first + count; ++k) {
        if (strips != nullptr) {
          load_from_strip(w.s, prob_strip(k), ld_strip, t);
        } else {
          head_scores(w.s, v, k, q_rows, lambda != nullptr ? w.sd : nullptr, w.iota, t);
          probs_from_lse(w.s, w.s, t.cols, lse_rows(k), t);
        }
        // dP = do . k (+ y . c), then dS = P (dP - Delta).
        gemm(rows, t.cols, head_dim, do_rows + k * head_dim, hd, v.key_tile(k, jb), kKeyBlock, w.ds, t.cols, false);
        for (int64_t ii = 0; ii < rows; ++ii) {
          T* ds_row = w.ds + ii * t.cols;
          const T* p_row = w.s + ii * t.cols;
          const T delta_i = w.delta[k * kQueryBlock + ii];
          if (lambda != nullptr) {
            const T* yc_row = w.yc + ii * t.cols;
            for (int64_t jj = 0; jj < t.cols; ++jj) ds_row[jj] = p_row[jj] * (ds_row[jj] + yc_row[jj] - delta_i);
          } else {
            for (int64_t jj = 0; jj < t.cols; ++jj) ds_row[jj] = p_row[jj] * (ds_row[jj] - delta_i);
          }
        }
        const T* k_rows = v.key_rows(jb) + k * head_dim;
        gemm(rows, head_dim, t.cols, w.ds, t.cols, k_rows, hd, w.dq + k * head_dim, hd, true);
        gemm<T, true>(t.cols, head_dim, rows, w.ds, t.cols, q_rows + k * head_dim, hd, dk_rows + k * head_dim, hd, true);
        gemm<T, true>(t.cols, head_dim, rows, w.s, t.cols, do_rows + k * head_dim, hd, dk_rows + k * head_dim, hd, true);
        if (lambda != nullptr && count > 1) {
          add_tile(w.pbar, w.s, t);
          add_tile(w.dsbar, w.ds, t);
        }
      }
      if (lambda == nullptr) return;
      const T* pbar = count > 1 ? w.pbar : w.s;
      const T* dsbar = count > 1 ? w.dsbar : w.ds;
      // Query side: r += dSbar c (lambda applied at the end) or dS^k (lambda_k c) per head.
      if (per_head) pack_lambda_context(w.lc, v, lambda, t);
      gemm(rows, dim, t.cols, dsbar, t.cols, per_head ? w.lc : v.context_rows(jb), dim, w.r, dim, true);
      // Key side: z = dSbar^T (beta x) + Pbar^T dG, then dc += lambda z and dlambda += c z.
      gemm<T, true>(t.cols, dim, rows, dsbar, t.cols, w.xs, dim, w.z, dim, false);
      gemm<T, true>(t.cols, dim, rows, pbar, t.cols, dg_rows, dim, w.z, dim, true);
      const T* c_rows = v.context_rows(jb);
      T* dc_rows = sums.grad_context + (b * n + t.j0) * dim;
      T* dlambda = sums.grad_diag + (lambda - in.diag);
      for (int64_t jj = 0; jj < t.cols; ++jj) {
        const T* z_row = w.z + jj * dim;
        const T* c_row = c_rows + jj * dim;
        T* dc_row = dc_rows + jj * dim;
        for (int64_t d = 0; d < dim; ++d) {
          dc_row[d] += lambda[d] * z_row[d];
          dlambda[d] += c_row[d] * z_row[d];
        }
      }
    });
  }

  T* dq_out = p.grad_queries + (b * n + i0) * hd;
  for (int64_t e = 0; e < rows * hd; ++e) dq_out[e] = in.scale * w.dq[e];
  if (has_diag) {
    T* dx_out = p.grad_x_scores + (b * n + i0) * dim;
    if (per_head) {
      for (int64_t e = 0; e < rows * dim; ++e) dx_out[e] = in.scale * w.r[e];
    } else {
      scale_by_lambda(dx_out, w.r, in.diag, in.scale, rows, dim);
    }
  }
}

}  // namespace cem::cpu::CEM_CPU_ISA
