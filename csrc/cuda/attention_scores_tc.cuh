// The tile loop shared by the tensor-core kernels that walk keys for a block of query rows
// (forward, Delta, deterministic dQ): the block's geometry, the double-buffered K (and score-bias)
// tiles, and the scores of one tile in the log2 domain, masked, in accumulator layout.
#pragma once

#include <cmath>

#include "cuda/attention_common.cuh"
#include "cuda/tensor_core_tiles.cuh"

namespace cem::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tiles of the query-row kernels: kBlockM query rows (16 per warp) x kBlockN keys, head dim
// padded to the kHeadDim bucket. Shared memory: Q | K[2] | X (a second row tile, dO, when
// kWithX) | score bias[2] | dp bias[2] (the float32 tiles only where a diagonal gives panels,
// dp bias only in the backward's kernels).
template <typename T_, int kHeadDim_, int kBlockM_, bool kWithX_ = false>
struct RowTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr bool kWithX = kWithX_;
  using QTile = tc::SwizzledTile<kBlockM, kHeadDim>;
  using KTile = tc::SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kBiasTile = kBlockM * kBlockN * 4;
  static constexpr int kOffK = round_up_128(QTile::kBytes);
  static constexpr int kOffX = kOffK + 2 * KTile::kBytes;
  static constexpr int kOffBias = kOffX + (kWithX ? QTile::kBytes : 0);
  static constexpr int kOffDpBias = kOffBias + 2 * kBiasTile;

  // The dynamic shared memory of a launch: the float32 tiles only where panels exist.
  static constexpr int smem_bytes(bool bias, bool dp_bias) {
    return dp_bias ? kOffDpBias + 2 * kBiasTile : (bias ? kOffDpBias : kOffBias);
  }
  static constexpr int kSmemMax = kOffDpBias + 2 * kBiasTile;
};

// One block's view of the query-row loop: which rows, which keys, which slices of the inputs.
template <class Tr>
struct RowBlock {
  using T = typename Tr::T;
  int b, h, q0, row0, rows_valid, last_tile;
  const T* q;
  const T* k;
  const float* bias;     // score-bias panel rows of this block, or null
  const float* dp_bias;  // dp-bias panel rows of this block (backward kernels), or null
  float scale2, slope2;
  bool bias_async;

  __device__ __forceinline__ RowBlock(const CemAttnParams& p) {
    b = blockIdx.z;
    h = blockIdx.y;
    q0 = p.row_begin + blockIdx.x * Tr::kBlockM;
    row0 = q0 + 16 * (threadIdx.x / 32);
    rows_valid = p.row_end - q0;
    last_tile = (min(q0 + Tr::kBlockM, p.row_end) - 1) / Tr::kBlockN;
    q = head_ptr<T>(p.q, b, h) + q0 * p.q.row_stride;
    k = head_ptr<T>(p.k, b, h);
    bias = panel_rows(p.score_bias, p);
    dp_bias = panel_rows(p.dp_bias, p);
    scale2 = p.scale * kLog2e;
    slope2 = alibi_slope<T>(p, h) * kLog2e;
    bias_async = p.score_bias.row_stride % 4 == 0 && p.dp_bias.row_stride % 4 == 0;
  }

  __device__ __forceinline__ const float* panel_rows(const CemPanel& panel, const CemAttnParams& p) const {
    const float* rows = panel_ptr(panel, b, h);
    return rows != nullptr ? rows + static_cast<int64_t>(q0 - p.row_begin) * panel.row_stride : nullptr;
  }

  __device__ __forceinline__ T* key_tile(int buffer) const {
    return smem_at<T>(Tr::kOffK + buffer * Tr::KTile::kBytes);
  }
  __device__ __forceinline__ float* bias_tile(int buffer) const {
    return smem_at<float>(Tr::kOffBias + buffer * Tr::kBiasTile);
  }
  __device__ __forceinline__ float* dp_bias_tile(int buffer) const {
    return smem_at<float>(Tr::kOffDpBias + buffer * Tr::kBiasTile);
  }
  __device__ __forceinline__ T* x_tile() const { return smem_at<T>(Tr::kOffX); }

  // Issues the loads of key tile `tile` (and its bias columns) into `buffer`.
  __device__ __forceinline__ void load_keys(const CemAttnParams& p, int tile, int buffer) const {
    const int k0 = tile * Tr::kBlockN;
    tc::load_tile<typename Tr::KTile, Tr::kThreads>(key_tile(buffer), k + k0 * p.k.row_stride, p.k.row_stride,
                                                    p.seq - k0, p.head_dim, p.vec_loads);
    if (bias != nullptr) {
      tc::load_float_tile<Tr::kBlockM, Tr::kBlockN, Tr::kThreads>(bias_tile(buffer), bias + k0, p.score_bias.row_stride,
                                                                  rows_valid, p.row_end - k0, bias_async);
    }
    if (dp_bias != nullptr) {
      tc::load_float_tile<Tr::kBlockM, Tr::kBlockN, Tr::kThreads>(dp_bias_tile(buffer), dp_bias + k0,
                                                                  p.dp_bias.row_stride, rows_valid, p.row_end - k0,
                                                                  bias_async);
    }
  }

  // Whether this warp has any unmasked score in key tile `tile` (rows at or after its first key).
  __device__ __forceinline__ bool warp_sees(const CemAttnParams& p, int tile) const {
    return row0 < p.row_end && tile * Tr::kBlockN <= row0 + 15;
  }

  // The top of the key loop: waits for key tile `tile` (issued by the previous call, or before the
  // loop for tile 0) and issues the next one into the other buffer. Whether this warp has work in
  // it (every thread must call it: it holds a barrier).
  __device__ __forceinline__ bool next_tile(const CemAttnParams& p, int tile) const {
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile landed for everyone; everyone is done with the other buffer
    if (tile < last_tile) load_keys(p, tile + 1, (tile + 1) & 1);
    ptx::cp_async_commit();
    return warp_sees(p, tile);
  }

  // This warp's 16 rows of a row tile (Q, dO) as A fragments.
  template <class Tile, int kK>
  __device__ __forceinline__ void warp_rows(ptx::FragA (&a)[kK], const T* tile) const {
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) tc::load_a<Tile>(a[kk], tile, 16 * (threadIdx.x / 32), kk);
  }

  // s (raw Q K^T of key tile `tile`, this warp's 16 rows) -> log2-domain scores, -inf where masked.
  template <int kN>
  __device__ __forceinline__ void finish_scores(const CemAttnParams& p, tc::Accumulator<kN>& s, int tile,
                                                const float* bias_rows) const {
    const int k0 = tile * Tr::kBlockN, warp_row = row0 - q0;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = tc::frag_row(i), c = tc::frag_col(n, i);
        const int qi = row0 + r, kj = k0 + c;
        float v = -INFINITY;
        if (kj <= qi && qi < p.row_end) {
          v = s.c[n].x[i] * scale2 + slope2 * static_cast<float>(kj - qi);  // ALiBi: -m (i - j)
          if (bias != nullptr) {
            v += bias_rows[(warp_row + r) * Tr::kBlockN + c] * kLog2e;
          }
        }
        s.c[n].x[i] = v;
      }
    }
  }
};

}  // namespace cem::cuda
