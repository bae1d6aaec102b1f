// Forward of one step's attention core on tensor cores (bf16/fp16), per (query tile of 128 rows,
// head, batch), FlashAttention-2 style: Q stays in registers as mma.sync A fragments; K tiles
// stream through double-buffered, swizzled shared memory by cp.async (with the tile's score
// biases when a diagonal is used); scores S = Q K^T and probabilities P live in registers, with
// log2(e) folded into the scale so that the online softmax runs on exp2; O = P K (V = K) reuses
// the K tile through ldmatrix.trans. One pass gives o and lse. With a probability panel (the
// diagonal's P or Pbar = sum_k P^k), a second pass over the same keys adds the normalized P into
// it: float32 atomics when heads share the panel.
#pragma once

#include <cmath>

#include "cuda/attention_scores_tc.cuh"

namespace cem::cuda {

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_tc_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kNB = Tr::kBlockN / 8, kDB = kD / 8;
  const RowBlock<Tr> blk(p);
  T* sQ = smem_at<T>(0);

  tc::load_tile<typename Tr::QTile, Tr::kThreads>(sQ, blk.q, p.q.row_stride, blk.rows_valid, p.head_dim, p.vec_loads);
  blk.load_keys(p, 0, 0);
  ptx::cp_async_commit();

  ptx::FragA qa[kD / 16];
  tc::Accumulator<kDB> o;
  o.zero();
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // log2 domain, rows g and g + 8

  for (int tile = 0; tile <= blk.last_tile; ++tile) {
    const bool sees = blk.next_tile(p, tile);
    if (tile == 0) blk.template warp_rows<typename Tr::QTile>(qa, sQ);
    if (!sees) continue;

    const T* sK = blk.key_tile(tile & 1);
    tc::Accumulator<kNB> s;
    s.zero();
    tc::mma_a_rows<T, typename Tr::KTile>(s, qa, sK);
    blk.finish_scores(p, s, tile, blk.bias_tile(tile & 1));

    // Online softmax: new row maxima, rescale what was accumulated, then P = exp2(s - max).
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int n = 0; n < kNB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) tile_max[i >> 1] = fmaxf(tile_max[i >> 1], s.c[n].x[i]);
    }
    float base[2], correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m = tc::quad_max(tile_max[r]);
      base[r] = m == -INFINITY ? 0.f : m;  // a fully masked row so far: no inf - inf
      correction[r] = exp2f(row_max[r] - base[r]);
      row_max[r] = m;
      row_sum[r] *= correction[r];
    }
#pragma unroll
    for (int n = 0; n < kDB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o.c[n].x[i] *= correction[i >> 1];
    }
#pragma unroll
    for (int n = 0; n < kNB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float prob = exp2f(s.c[n].x[i] - base[i >> 1]);
        s.c[n].x[i] = prob;
        row_sum[i >> 1] += prob;
      }
    }
    ptx::FragA pa[kNB / 2];
    tc::to_a_fragments<T>(pa, s);
    tc::mma_a_cols<T, typename Tr::KTile>(o, pa, sK);
  }

  // o = O / l, lse = ln(sum exp(s)) = (max + log2 l) ln 2.
  float lse2[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = tc::quad_sum(row_sum[r]);
    lse2[r] = row_max[r] + log2f(l);
    row_sum[r] = 1.f / l;
  }
  T* o_bh = head_ptr_mut<T>(p.o, blk.b, blk.h);
  float* lse_bh = stat_ptr(p.lse, p, blk.b, blk.h);
#pragma unroll
  for (int n = 0; n < kDB; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int qi = blk.row0 + tc::frag_row(i), d = tc::frag_col(n, i);
      if (qi < p.row_end && d < p.head_dim) {
        o_bh[qi * p.o.row_stride + d] = from_float<T>(o.c[n].x[i] * row_sum[i >> 1]);
      }
    }
  }
  if ((threadIdx.x & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = blk.row0 + tc::frag_row(2 * r);
      if (qi < p.row_end) lse_bh[qi] = lse2[r] * kLn2;
    }
  }
  if (p.probs.ptr == nullptr) return;

  // Second pass: the normalized P of every tile into the panel (Q is still in registers).
  float* probs = panel_ptr(p.probs, blk.b, p.probs_per_head ? blk.h : 0);
  __syncthreads();  // the key buffers are reused
  blk.load_keys(p, 0, 0);
  ptx::cp_async_commit();
  for (int tile = 0; tile <= blk.last_tile; ++tile) {
    if (!blk.next_tile(p, tile)) continue;
    tc::Accumulator<kNB> s;
    s.zero();
    tc::mma_a_rows<T, typename Tr::KTile>(s, qa, blk.key_tile(tile & 1));
    blk.finish_scores(p, s, tile, blk.bias_tile(tile & 1));
#pragma unroll
    for (int n = 0; n < kNB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qi = blk.row0 + tc::frag_row(i), kj = tile * Tr::kBlockN + tc::frag_col(n, i);
        if (kj <= qi && qi < p.row_end) {
          float* cell = probs + static_cast<int64_t>(qi - p.row_begin) * p.probs.row_stride + kj;
          const float prob = exp2f(s.c[n].x[i] - lse2[i >> 1]);
          if (p.probs_per_head) {
            *cell = prob;
          } else {
            atomicAdd(cell, prob);
          }
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // nothing may stay in flight past the end
}

}  // namespace cem::cuda
