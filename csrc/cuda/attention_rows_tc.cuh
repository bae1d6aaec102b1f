// The two backward kernels that walk keys for a block of 64 query rows on tensor cores
// (bf16/fp16), in the forward's tile loop (attention_scores_tc.cuh):
//   Delta_i = dO_i . o_i + sum_j p_ij dp_bias_ij  (the second term only with a diagonal: "pass 1"
//             of docs/backward.md, the one pass over keys it needs);
//   dQ_i = beta sum_j dS_ij k_j, written once per row: the deterministic mode, where the main
//          backward kernel leaves dQ out instead of adding it with atomics.
#pragma once

#include <cmath>

#include "cuda/attention_scores_tc.cuh"

namespace cem::cuda {

// lse (log2 domain) and Delta of this lane's rows g and g + 8.
template <class Tr>
__device__ __forceinline__ void lane_row_values(const CemAttnParams& p, const RowBlock<Tr>& blk, const float* values,
                                                float scale, float (&out)[2]) {
  const float* rows = stat_ptr(values, p, blk.b, blk.h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int qi = blk.row0 + tc::frag_row(2 * r);
    out[r] = qi < p.row_end ? rows[qi] * scale : 0.f;
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_delta_tc_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kNB = Tr::kBlockN / 8;
  const RowBlock<Tr> blk(p);
  const int t = threadIdx.x & 3;

  // dO . o: lanes t = 0..3 of a row group take every fourth element of rows g and g + 8.
  float sums[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sums[r] = partial_dout_dot_o<T>(p, blk.b, blk.h, blk.row0 + tc::frag_row(2 * r), t, 4);
  }

  if (blk.dp_bias != nullptr) {  // uniform over the block
    T* sQ = smem_at<T>(0);
    float lse2[2];
    lane_row_values(p, blk, p.lse, kLog2e, lse2);
    tc::load_tile<typename Tr::QTile, Tr::kThreads>(sQ, blk.q, p.q.row_stride, blk.rows_valid, p.head_dim, p.vec_loads);
    blk.load_keys(p, 0, 0);
    ptx::cp_async_commit();
    ptx::FragA qa[kD / 16];
    for (int tile = 0; tile <= blk.last_tile; ++tile) {
      const bool sees = blk.next_tile(p, tile);
      if (tile == 0) blk.template warp_rows<typename Tr::QTile>(qa, sQ);
      if (!sees) continue;
      tc::Accumulator<kNB> s;
      s.zero();
      tc::mma_a_rows<T, typename Tr::KTile>(s, qa, blk.key_tile(tile & 1));
      blk.finish_scores(p, s, tile, blk.bias_tile(tile & 1));
      const float* dpb = blk.dp_bias_tile(tile & 1);
#pragma unroll
      for (int n = 0; n < kNB; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float prob = exp2f(s.c[n].x[i] - lse2[i >> 1]);  // 0 where masked
          const int row = blk.row0 - blk.q0 + tc::frag_row(i);
          sums[i >> 1] += prob * dpb[row * Tr::kBlockN + tc::frag_col(n, i)];
        }
      }
    }
    ptx::cp_async_wait<0>();
  }

  float* delta_bh = stat_ptr(p.delta, p, blk.b, blk.h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = tc::quad_sum(sums[r]);
    const int qi = blk.row0 + tc::frag_row(2 * r);
    if (t == 0 && qi < p.row_end) delta_bh[qi] = total;
  }
}

// Tr: RowTraits with kWithX (the dO tile).
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_dq_tc_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kNB = Tr::kBlockN / 8, kDB = kD / 8;
  const RowBlock<Tr> blk(p);
  T* sQ = smem_at<T>(0);
  T* sdO = blk.x_tile();

  float lse2[2], delta[2];
  lane_row_values(p, blk, p.lse, kLog2e, lse2);
  lane_row_values(p, blk, p.delta, 1.f, delta);
  tc::load_tile<typename Tr::QTile, Tr::kThreads>(sQ, blk.q, p.q.row_stride, blk.rows_valid, p.head_dim, p.vec_loads);
  tc::load_tile<typename Tr::QTile, Tr::kThreads>(sdO, head_ptr<T>(p.dout, blk.b, blk.h) + blk.q0 * p.dout.row_stride,
                                                  p.dout.row_stride, blk.rows_valid, p.head_dim, p.vec_loads);
  blk.load_keys(p, 0, 0);
  ptx::cp_async_commit();

  ptx::FragA qa[kD / 16], doa[kD / 16];
  tc::Accumulator<kDB> dq;
  dq.zero();
  for (int tile = 0; tile <= blk.last_tile; ++tile) {
    const bool sees = blk.next_tile(p, tile);
    if (tile == 0) {
      blk.template warp_rows<typename Tr::QTile>(qa, sQ);
      blk.template warp_rows<typename Tr::QTile>(doa, sdO);
    }
    if (!sees) continue;

    const T* sK = blk.key_tile(tile & 1);
    tc::Accumulator<kNB> s, ds;
    s.zero();
    ds.zero();
    tc::mma_a_rows<T, typename Tr::KTile>(s, qa, sK);
    tc::mma_a_rows<T, typename Tr::KTile>(ds, doa, sK);
    blk.finish_scores(p, s, tile, blk.bias_tile(tile & 1));
    const float* dpb = blk.dp_bias != nullptr ? blk.dp_bias_tile(tile & 1) : nullptr;
#pragma unroll
    for (int n = 0; n < kNB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float prob = exp2f(s.c[n].x[i] - lse2[i >> 1]);  // 0 where masked
        float dp = ds.c[n].x[i];
        if (dpb != nullptr) dp += dpb[(blk.row0 - blk.q0 + tc::frag_row(i)) * Tr::kBlockN + tc::frag_col(n, i)];
        ds.c[n].x[i] = p.scale * prob * (dp - delta[i >> 1]);
      }
    }
    ptx::FragA dsa[kNB / 2];
    tc::to_a_fragments<T>(dsa, ds);
    tc::mma_a_cols<T, typename Tr::KTile>(dq, dsa, sK);
  }
  ptx::cp_async_wait<0>();

  float* dq_bh = head_ptr_mut<float>(p.dq, blk.b, blk.h);
#pragma unroll
  for (int n = 0; n < kDB; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int qi = blk.row0 + tc::frag_row(i), d = tc::frag_col(n, i);
      if (qi < p.row_end && d < p.head_dim) dq_bh[qi * p.dq.row_stride + d] = dq.c[n].x[i];
    }
  }
}

}  // namespace cem::cuda
