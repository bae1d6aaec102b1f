// Tile steps shared by the forward and backward attention blocks: the diagonal operands of a
// head group, the score tile s = beta (q.k + (lambda * x).c) + bias with its causal mask, and
// probabilities from a known log-sum-exp. Compiled once per instruction set (see tile_math.h).
#pragma once

#include "cpu/attention_core.h"
#include "cpu/tile_math.h"

namespace cem::cpu::CEM_CPU_ISA {

// Hands out consecutive pieces of a work item's workspace.
template <typename T>
struct Arena {
  T* next;
  T* take(int64_t n) {
    T* piece = next;
    next += n;
    return piece;
  }
};

// Query rows [i0, i0 + rows) against key columns [j0, j0 + cols) of key block jb; tiles are
// stored with row stride cols.
struct Tile {
  int64_t i0, rows, jb, j0, cols;
  // Causal mask: row ii sees keys j <= i, i.e. the first valid(ii) columns of the tile.
  int64_t valid(int64_t ii) const { return std::clamp<int64_t>(i0 + ii - j0 + 1, 0, cols); }
};

// Where the tiles of one work item start.
template <typename T>
struct ItemView {
  const AttnCoreInputs<T>& in;
  int64_t b, i0, rows, key_blocks;

  Tile tile(int64_t jb) const {
    const int64_t j0 = jb * kKeyBlock;
    return Tile{i0, rows, jb, j0, std::min(kKeyBlock, in.seq - j0)};
  }
  // (Dh x kKeyBlock) panel of k^T for head k and key block jb.
  const T* key_tile(int64_t head, int64_t jb) const {
    const int64_t blocks = key_blocks_of(in.seq);
    return in.key_tiles + ((b * in.heads + head) * blocks + jb) * in.head_dim * kKeyBlock;
  }
  // (D x kKeyBlock) panel of c^T for key block jb.
  const T* context_tile(int64_t jb) const {
    return in.context_tiles + (b * key_blocks_of(in.seq) + jb) * in.dim * kKeyBlock;
  }
  // Rows of key block jb in the (B, N, H * Dh) keys and (B, N, D) context.
  const T* key_rows(int64_t jb) const { return in.keys + (b * in.seq + jb * kKeyBlock) * in.heads * in.head_dim; }
  const T* context_rows(int64_t jb) const { return in.context + (b * in.seq + jb * kKeyBlock) * in.dim; }
};

// Heads that meet the D-wide terms together: all heads for a shared diagonal (their scores
// share (lambda * x).c and only Pbar = sum_k P^k and dSbar = sum_k dS^k meet c), each head on
// its own for a per-head diagonal, all heads (with no lambda) without a diagonal.
template <typename T, typename F>
inline void for_each_head_group(const AttnCoreInputs<T>& in, F&& f) {
  switch (in.diag_kind) {
    case DiagKind::kNone: f(int64_t{0}, in.heads, static_cast<const T*>(nullptr)); break;
    case DiagKind::kShared: f(int64_t{0}, in.heads, in.diag); break;
    case DiagKind::kPerHead:
      for (int64_t k = 0; k < in.heads; ++k) f(k, int64_t{1}, in.diag + k * in.dim);
      break;
  }
}

// out (rows x D) = alpha * lambda * in: puts the diagonal on the query side of a product.
template <typename T>
inline void scale_by_lambda(T* out, const T* in, const T* lambda, T alpha, int64_t rows, int64_t dim) {
  for (int64_t ii = 0; ii < rows; ++ii)
    for (int64_t d = 0; d < dim; ++d) out[ii * dim + d] = alpha * lambda[d] * in[ii * dim + d];
}

// lc (cols x D) = lambda_k * c_j: the value rows of one head's diagonal (per-head only; a
// shared lambda is applied once to the finished row sums instead).
template <typename T>
inline void pack_lambda_context(T* lc, const ItemView<T>& v, const T* lambda, const Tile& t) {
  const int64_t dim = v.in.dim;
  const T* c = v.context_rows(t.jb);
  for (int64_t jj = 0; jj < t.cols; ++jj)
    for (int64_t d = 0; d < dim; ++d) lc[jj * dim + d] = lambda[d] * c[jj * dim + d];
}

// out (rows x cols) = a (rows x D) . c_j for the key block: the diagonal scores with
// a = beta lambda * x, and y . c with a = lambda * dG.
template <typename T>
inline void times_context(T* out, const T* a, const ItemView<T>& v, const Tile& t) {
  gemm(t.rows, t.cols, v.in.dim, a, v.in.dim, v.context_tile(t.jb), kKeyBlock, out, t.cols, false);
}

// s = (beta q^k_i) . k^k_j + sd + ALiBi bias -m_k (i - j). iota holds 0, 1, 2, ... so the
// distance i - j is formed exactly in T, as the reference does.
template <typename T>
inline void head_scores(
    T* s, const ItemView<T>& v, int64_t head, const T* q_rows, const T* sd, const T* iota, const Tile& t) {
  const AttnCoreInputs<T>& in = v.in;
  const int64_t hd = in.heads * in.head_dim;
  gemm(t.rows, t.cols, in.head_dim, q_rows + head * in.head_dim, hd, v.key_tile(head, t.jb), kKeyBlock, s, t.cols,
       false);
  const bool alibi = in.alibi_slopes != nullptr;
  if (sd == nullptr && !alibi) return;
  const T neg_slope = alibi ? -in.alibi_slopes[head] : T(0);
  for (int64_t ii = 0; ii < t.rows; ++ii) {
    T* row = s + ii * t.cols;
    if (sd != nullptr) {
      const T* sd_row = sd + ii * t.cols;
      for (int64_t jj = 0; jj < t.cols; ++jj) row[jj] += sd_row[jj];
    }
    if (alibi) {
      const T base = static_cast<T>(t.i0 + ii - t.j0);
      for (int64_t jj = 0; jj < t.cols; ++jj) row[jj] += neg_slope * (base - iota[jj]);
    }
  }
}

// p = exp(s - lse_i) on the causal part of the tile, 0 above the diagonal (in place allowed).
// s has row stride ld_s (a tile, or its place in a strip).
template <typename T>
inline void probs_from_lse(T* p, const T* s, int64_t ld_s, const T* lse_rows, const Tile& t) {
  for (int64_t ii = 0; ii < t.rows; ++ii) {
    const int64_t n = t.valid(ii);
    exp_shifted(p + ii * t.cols, s + ii * ld_s, n, lse_rows[ii]);
    for (int64_t jj = n; jj < t.cols; ++jj) p[ii * t.cols + jj] = T(0);
  }
}

// Copies a tile (row stride cols) into its columns of a strip (row stride ld) and back.
template <typename T>
inline void store_to_strip(T* strip, int64_t ld, const T* tile, const Tile& t) {
  for (int64_t ii = 0; ii < t.rows; ++ii) std::copy(tile + ii * t.cols, tile + (ii + 1) * t.cols, strip + ii * ld + t.j0);
}

template <typename T>
inline void load_from_strip(T* tile, const T* strip, int64_t ld, const Tile& t) {
  for (int64_t ii = 0; ii < t.rows; ++ii) std::copy(strip + ii * ld + t.j0, strip + ii * ld + t.j0 + t.cols, tile + ii * t.cols);
}

template <typename T>
inline void add_tile(T* acc, const T* tile, const Tile& t) {
  for (int64_t e = 0; e < t.rows * t.cols; ++e) acc[e] += tile[e];
}

}  // namespace cem::cpu::CEM_CPU_ISA
