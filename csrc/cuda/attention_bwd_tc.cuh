// Backward of one step's attention core on tensor cores (bf16/fp16), key-block outer
// (FlashAttention-2's scheme), per (key tile of 64, head, batch): each of the 4 warps keeps the
// dK rows of its 16 keys as accumulators in registers (the keys themselves stay in shared memory)
// while the query tiles of the launch stream through double-buffered shared memory (Q, dO, lse, Delta and, with a
// diagonal, the score and dp bias tiles). Per query tile, in registers:
//   S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = K dO^T (+ dp bias), dS^T = P^T (dP^T - Delta),
//   dK += beta dS^T Q + P^T dO (V = K: the value gradient lands on the keys),
// and, unless the deterministic kernel takes over, dQ += beta dS K through a shared dS tile and
// float32 atomics. With a diagonal, P and dS also go into the float32 panels of the D-wide terms.
#pragma once

#include <climits>
#include <cmath>

#include "cuda/attention_scores_tc.cuh"

namespace cem::cuda {

template <typename T_, int kHeadDim_>
struct KeyTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = 64;  // keys per block, 16 per warp
  static constexpr int kBlockM = 64;  // queries per streamed tile
  static constexpr int kWarps = kBlockN / 16;
  static constexpr int kThreads = 32 * kWarps;
  using KTile = tc::SwizzledTile<kBlockN, kHeadDim>;
  using QTile = tc::SwizzledTile<kBlockM, kHeadDim>;
  using DsTile = tc::SwizzledTile<kBlockM, kBlockN>;  // beta dS, queries x keys, for dQ
  static constexpr int kBiasTile = kBlockM * kBlockN * 4;
  // One stage: Q | dO | lse | Delta | score bias | dp bias (the last two with a diagonal).
  static constexpr int kStageRows = 2 * QTile::kBytes + 2 * round_up_128(kBlockM * 4);
  static constexpr int kStage = kStageRows + 2 * kBiasTile;
  static constexpr int kOffDs = round_up_128(KTile::kBytes);
  static constexpr int kOffStages = kOffDs + DsTile::kBytes;

  static constexpr int smem_bytes(bool bias) { return kOffStages + 2 * (bias ? kStage : kStageRows); }
  static constexpr int kSmemMax = kOffStages + 2 * kStage;
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_tc_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kD = Tr::kHeadDim, kM = Tr::kBlockM, kQB = kM / 8, kDB = kD / 8;
  const bool diag = p.score_bias.ptr != nullptr;
  const int stage_bytes = diag ? Tr::kStage : Tr::kStageRows;
  const int b = blockIdx.z, h = blockIdx.y;
  const int k0 = blockIdx.x * Tr::kBlockN;
  const int warp = threadIdx.x / 32;
  const int key0 = k0 + 16 * warp;  // this warp's first key
  const float scale2 = p.scale * kLog2e, slope2 = alibi_slope<T>(p, h) * kLog2e;

  T* sK = smem_at<T>(0);
  T* sDs = smem_at<T>(Tr::kOffDs);
  auto stage = [&](int buffer) { return Tr::kOffStages + buffer * stage_bytes; };
  auto stage_q = [&](int buffer) { return smem_at<T>(stage(buffer)); };
  auto stage_do = [&](int buffer) { return smem_at<T>(stage(buffer) + Tr::QTile::kBytes); };
  auto stage_lse = [&](int buffer) { return smem_at<float>(stage(buffer) + 2 * Tr::QTile::kBytes); };
  auto stage_delta = [&](int buffer) { return smem_at<float>(stage(buffer) + 2 * Tr::QTile::kBytes + round_up_128(kM * 4)); };
  auto stage_bias = [&](int buffer) { return smem_at<float>(stage(buffer) + Tr::kStageRows); };
  auto stage_dp_bias = [&](int buffer) { return smem_at<float>(stage(buffer) + Tr::kStageRows + Tr::kBiasTile); };

  const T* q_bh = head_ptr<T>(p.q, b, h);
  const T* do_bh = head_ptr<T>(p.dout, b, h);
  const float* lse_bh = stat_ptr(p.lse, p, b, h);
  const float* delta_bh = stat_ptr(p.delta, p, b, h);
  const float* score_bias = panel_ptr(p.score_bias, b, h);
  const float* dp_bias = panel_ptr(p.dp_bias, b, h);
  const bool bias_async = p.score_bias.row_stride % 4 == 0 && p.dp_bias.row_stride % 4 == 0;
  float* probs = panel_ptr(p.probs, b, p.probs_per_head ? h : 0);
  float* dprobs = panel_ptr(p.dprobs, b, p.probs_per_head ? h : 0);

  // Query tiles: those of the launch at or after this key tile.
  const int first = max(k0, p.row_begin) / kM, last = (p.row_end - 1) / kM;
  auto load_stage = [&](int tile, int buffer) {
    const int q0 = tile * kM, rows = p.row_end - q0;
    tc::load_tile<typename Tr::QTile, Tr::kThreads>(stage_q(buffer), q_bh + q0 * p.q.row_stride, p.q.row_stride, rows,
                                                    p.head_dim, p.vec_loads);
    tc::load_tile<typename Tr::QTile, Tr::kThreads>(stage_do(buffer), do_bh + q0 * p.dout.row_stride,
                                                    p.dout.row_stride, rows, p.head_dim, p.vec_loads);
    tc::load_row_values<kM, Tr::kThreads>(stage_lse(buffer), lse_bh + q0, rows);
    tc::load_row_values<kM, Tr::kThreads>(stage_delta(buffer), delta_bh + q0, rows);
    if (diag) {
      const int64_t r = q0 - p.row_begin;
      tc::load_float_tile<kM, Tr::kBlockN, Tr::kThreads>(stage_bias(buffer), score_bias + r * p.score_bias.row_stride + k0,
                                                         p.score_bias.row_stride, rows, p.row_end - k0, bias_async);
      tc::load_float_tile<kM, Tr::kBlockN, Tr::kThreads>(stage_dp_bias(buffer), dp_bias + r * p.dp_bias.row_stride + k0,
                                                         p.dp_bias.row_stride, rows, p.row_end - k0, bias_async);
    }
  };

  tc::load_tile<typename Tr::KTile, Tr::kThreads>(sK, head_ptr<T>(p.k, b, h) + k0 * p.k.row_stride, p.k.row_stride,
                                                  p.seq - k0, p.head_dim, p.vec_loads);
  load_stage(first, 0);
  ptx::cp_async_commit();

  tc::Accumulator<kDB> dk;
  dk.zero();
  for (int tile = first; tile <= last; ++tile) {
    const int buffer = (tile - first) & 1, q0 = tile * kM;
    ptx::cp_async_wait<0>();
    __syncthreads();  // this stage landed; the other stage and the dS tile are free again
    if (tile < last) load_stage(tile + 1, buffer ^ 1);
    ptx::cp_async_commit();
    // The warp's keys as A fragments, read again every tile: kept in registers beside dK they
    // would spill at head dim 128 on sm_80.
    ptx::FragA ka[kD / 16];
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) tc::load_a<typename Tr::KTile>(ka[kk], sK, 16 * warp, kk);

    const T* sQ = stage_q(buffer);
    const T* sdO = stage_do(buffer);
    const float* sLse = stage_lse(buffer);
    const float* sDelta = stage_delta(buffer);
    tc::Accumulator<kQB> pt, dst;  // P^T and dP^T -> dS^T: rows = this warp's keys, columns = queries
    pt.zero();
    dst.zero();
    tc::mma_a_rows<T, typename Tr::QTile>(pt, ka, sQ);
    tc::mma_a_rows<T, typename Tr::QTile>(dst, ka, sdO);
#pragma unroll
    for (int n = 0; n < kQB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = tc::frag_row(i), c = tc::frag_col(n, i);
        const int kj = key0 + r, qi = q0 + c;
        float prob = 0.f, ds = 0.f;
        if (kj <= qi && qi < p.row_end) {
          float s2 = pt.c[n].x[i] * scale2 + slope2 * static_cast<float>(kj - qi);
          float dp = dst.c[n].x[i];
          if (diag) {
            s2 += stage_bias(buffer)[c * Tr::kBlockN + (kj - k0)] * kLog2e;
            dp += stage_dp_bias(buffer)[c * Tr::kBlockN + (kj - k0)];
          }
          prob = exp2f(s2 - sLse[c] * kLog2e);
          ds = prob * (dp - sDelta[c]);
          if (probs != nullptr) {
            const int64_t cell = static_cast<int64_t>(qi - p.row_begin) * p.probs.row_stride + kj;
            if (p.probs_per_head) {
              probs[cell] = prob;
              dprobs[cell] = ds;
            } else {
              atomicAdd(probs + cell, prob);
              atomicAdd(dprobs + cell, ds);
            }
          }
        }
        pt.c[n].x[i] = prob;
        dst.c[n].x[i] = p.scale * ds;
      }
    }
    // dK += beta dS^T Q + P^T dO.
    ptx::FragA a[kQB / 2];
    tc::to_a_fragments<T>(a, dst);
    tc::mma_a_cols<T, typename Tr::QTile>(dk, a, sQ);
    tc::to_a_fragments<T>(a, pt);
    tc::mma_a_cols<T, typename Tr::QTile>(dk, a, sdO);
    if (!p.dq_atomic) continue;

    // dQ += beta dS K: the warps' dS^T fragments, transposed into a shared queries x keys tile.
#pragma unroll
    for (int n = 0; n < kQB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = 16 * warp + tc::frag_row(i), query = tc::frag_col(n, i);
        sDs[Tr::DsTile::offset(query, key / 8) + key % 8] = from_float<T>(dst.c[n].x[i]);
      }
    }
    __syncthreads();
    ptx::FragA dsa[Tr::kBlockN / 16];
#pragma unroll
    for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) tc::load_a<typename Tr::DsTile>(dsa[kk], sDs, 16 * warp, kk);
    tc::Accumulator<kDB> dq;
    dq.zero();
    tc::mma_a_cols<T, typename Tr::KTile>(dq, dsa, sK);
    float* dq_bh = head_ptr_mut<float>(p.dq, b, h);
#pragma unroll
    for (int n = 0; n < kDB; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qi = q0 + 16 * warp + tc::frag_row(i), d = tc::frag_col(n, i);
        if (qi < p.row_end && d < p.head_dim) atomicAdd(dq_bh + qi * p.dq.row_stride + d, dq.c[n].x[i]);
      }
    }
  }
  ptx::cp_async_wait<0>();

  float* dk_bh = head_ptr_mut<float>(p.dk, b, h);
  const bool overwrite = k0 >= p.dk_overwrite_from;
#pragma unroll
  for (int n = 0; n < kDB; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int kj = key0 + tc::frag_row(i), d = tc::frag_col(n, i);
      if (kj < p.seq && d < p.head_dim) {
        float* cell = dk_bh + kj * p.dk.row_stride + d;
        *cell = overwrite ? dk.c[n].x[i] : *cell + dk.c[n].x[i];
      }
    }
  }
}

}  // namespace cem::cuda
