// The attention kernels of one (dtype, head-dim bucket) specialization. Included only by the
// generated instantiation TUs (attention_<dtype>_hdim<N>.cu).
//
// Tiles are kBlock = 64 query rows x 64 keys; each of the 4 warps owns 16 rows of a tile, so the
// softmax arithmetic between the matrix products needs only __syncwarp. Scores are staged in
// shared memory as float32 (WMMA fragments have no documented element layout), the output
// accumulators stay in registers. All per-head work is Dh wide; the D-wide diagonal terms arrive
// as float32 row panels (score_bias, dp_bias) computed once for all heads by cuBLAS.
#pragma once

#include <cmath>

#include "cuda/attention_params.h"
#include "cuda/device_runtime.cuh"
#include "cuda/kernel_registry.h"
#include "cuda/tile_ops.cuh"

namespace cem::cuda {

template <typename U>
__device__ __forceinline__ U* smem_at(int offset) {
  return reinterpret_cast<U*>(dynamic_smem() + offset);
}

constexpr int round_up_128(int bytes) { return (bytes + 127) / 128 * 128; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T_, int kHeadDim_>
struct AttnTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim of the tiles
  static constexpr int kBlock = 64;           // query rows and keys per tile
  static constexpr int kWarps = kBlock / 16;  // each warp owns 16 rows of a tile
  static constexpr int kThreads = kWarps * 32;
  static constexpr bool kIsFloat = std::is_same_v<T, float>;
  // Row padding keeps WMMA's 32-byte alignment (16 rows x ld) and spreads rows over banks.
  static constexpr int kPad = kIsFloat ? 4 : 8;
  static constexpr int kLdX = kHeadDim + kPad;  // q, k, dO tiles (T)
  static constexpr int kLdS = kBlock + 4;       // scores and dP (float)
  static constexpr int kLdP = kBlock + kPad;    // P and dS (T); for float they overwrite S and dP
  static constexpr int kLdAcc = kHeadDim + 4;   // float staging of an output tile

  static constexpr int kTileX = round_up_128(kBlock * kLdX * static_cast<int>(sizeof(T)));
  static constexpr int kTileS = round_up_128(kBlock * kLdS * 4);
  static constexpr int kTileP = kIsFloat ? 0 : round_up_128(kBlock * kLdP * static_cast<int>(sizeof(T)));
  static constexpr int kStage = round_up_128(kBlock * kLdAcc * 4);
  static constexpr int kStat = round_up_128(kBlock * 4);

  // Dynamic shared memory of each kernel (layouts in the kernels below).
  static constexpr int kSmemFwd = kTileX + cmax(kTileX + kTileS + kTileP, kStage);
  static constexpr int kSmemDelta = 2 * kTileX + kTileS;
  static constexpr int kSmemDq = 2 * kTileX + cmax(kTileX + 2 * kTileS + kTileP, kStage);
  static constexpr int kSmemDk = kTileX + cmax(2 * kTileX + 2 * kTileS + 2 * kTileP + 2 * kStat, kStage);
  static constexpr int kSmemProbs = 3 * kTileX + 2 * kTileS + 2 * kStat;
  static constexpr int kSmemMax = cmax(cmax(cmax(kSmemFwd, kSmemDelta), cmax(kSmemDq, kSmemDk)), kSmemProbs);

  static_assert(kHeadDim % 16 == 0, "head-dim bucket must be a multiple of 16");
  static_assert(!kIsFloat || kLdP == kLdS, "float probabilities are written over their scores");
  static_assert(kSmemMax <= 160 * 1024, "tile layout exceeds the sm_80 shared-memory limit");
};

// Everything that turns a raw Q.K product into the score s_ij of one (batch, head).
struct ScoreTerms {
  float scale, slope;
  const float* bias;  // score_bias panel of this (batch, head), or null
  int64_t bias_row_stride;
  int row_begin;

  __device__ __forceinline__ float operator()(float raw, int i, int j) const {
    float s = scale * raw + slope * static_cast<float>(j - i);  // ALiBi: -m (i - j)
    if (bias != nullptr) {
      s += bias[(i - row_begin) * bias_row_stride + j];
    }
    return s;
  }
};

template <typename T>
__device__ __forceinline__ ScoreTerms score_terms(const CemAttnParams& p, int b, int h) {
  ScoreTerms t;
  t.scale = p.scale;
  t.slope = p.alibi_slopes != nullptr ? to_float(static_cast<const T*>(p.alibi_slopes)[h]) : 0.f;
  t.bias = p.score_bias.ptr != nullptr
               ? static_cast<const float*>(p.score_bias.ptr) + b * p.score_bias.batch_stride + h * p.score_bias.head_stride
               : nullptr;
  t.bias_row_stride = p.score_bias.row_stride;
  t.row_begin = p.row_begin;
  return t;
}

// dp_bias of one (batch, head), or null.
__device__ __forceinline__ const float* dp_bias_of(const CemAttnParams& p, int b, int h) {
  return p.dp_bias.ptr != nullptr
             ? static_cast<const float*>(p.dp_bias.ptr) + b * p.dp_bias.batch_stride + h * p.dp_bias.head_stride
             : nullptr;
}

template <typename T>
__device__ __forceinline__ const T* head_ptr(const CemHeadTensor& t, int b, int h) {
  return static_cast<const T*>(t.ptr) + b * t.batch_stride + h * t.head_stride;
}

// out (16 x kBlock, float, this warp's rows) = A_w (16 x kHeadDim) * B^T, with B a kBlock x
// kHeadDim tile: scores Q K^T, dP = dO K^T, and their transposes K Q^T, K dO^T.
template <class Tr>
__device__ __forceinline__ void warp_product_nt(const typename Tr::T* a_rows, const typename Tr::T* b_tile, float* out_rows) {
  WarpTile<typename Tr::T, Tr::kBlock> tile;
  tile.zero();
  tile.template mma<RowMajor, ColMajor, Tr::kHeadDim>(a_rows, Tr::kLdX, b_tile, Tr::kLdX);
  tile.store(out_rows, Tr::kLdS);
}

// ---------------------------------------------------------------------------------------------
// Forward: per (query tile, head, batch). Pass 1 finds each row's log-sum-exp, pass 2 forms the
// normalized probabilities and o = P K (values are the keys), so the output accumulator never
// needs rescaling and stays in registers. Layout: Q | K | S | P, the output staging over K...
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kB = Tr::kBlock, kD = Tr::kHeadDim;
  T* sQ = smem_at<T>(0);
  T* sK = smem_at<T>(Tr::kTileX);
  float* sS = smem_at<float>(2 * Tr::kTileX);
  T* sP = Tr::kIsFloat ? reinterpret_cast<T*>(sS) : smem_at<T>(2 * Tr::kTileX + Tr::kTileS);
  float* sStage = smem_at<float>(Tr::kTileX);

  const int b = blockIdx.z, h = blockIdx.y;
  const int qb = p.row_begin / kB + blockIdx.x;
  const int q0 = qb * kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_limit = p.row_end;
  const T* q_bh = head_ptr<T>(p.q, b, h);
  const T* k_bh = head_ptr<T>(p.k, b, h);
  const ScoreTerms score = score_terms<T>(p, b, h);

  load_tile<T, kB, kD, Tr::kThreads>(sQ, Tr::kLdX, q_bh + q0 * p.q.row_stride, p.q.row_stride, row_limit - q0, p.head_dim, p.vec_loads);

  // Pass 1: each lane keeps an online (max, sum) per row over its own columns; one merge at the end.
  float row_max[16], row_sum[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  for (int kb = 0; kb <= qb; ++kb) {
    __syncthreads();
    load_tile<T, kB, kD, Tr::kThreads>(sK, Tr::kLdX, k_bh + kb * kB * p.k.row_stride, p.k.row_stride, p.seq - kb * kB, p.head_dim, p.vec_loads);
    __syncthreads();
    warp_product_nt<Tr>(sQ + warp * 16 * Tr::kLdX, sK, sS + warp * 16 * Tr::kLdS);
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = q0 + warp * 16 + r;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = lane + 32 * half;
        const int j = kb * kB + c;
        if (i < row_limit && j <= i) {
          const float s = score(sS[(warp * 16 + r) * Tr::kLdS + c], i, j);
          if (s > row_max[r]) {
            row_sum[r] = row_sum[r] * expf(row_max[r] - s) + 1.f;
            row_max[r] = s;
          } else {
            row_sum[r] += expf(s - row_max[r]);
          }
        }
      }
    }
  }
  float lse[16];
  float* lse_bh = p.lse + b * p.stat_batch_stride + h * p.stat_head_stride;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const float m = warp_max(row_max[r]);
    const float l = warp_sum(row_max[r] == -INFINITY ? 0.f : row_sum[r] * expf(row_max[r] - m));
    lse[r] = m + logf(l);  // rows past the end: -inf, never used
    const int i = q0 + warp * 16 + r;
    if (lane == r && i < row_limit) {
      lse_bh[i] = lse[r];
    }
  }

  // Pass 2: o = sum_j p_ij k_j with p already normalized.
  WarpTile<T, kD> acc;
  acc.zero();
  for (int kb = 0; kb <= qb; ++kb) {
    __syncthreads();
    load_tile<T, kB, kD, Tr::kThreads>(sK, Tr::kLdX, k_bh + kb * kB * p.k.row_stride, p.k.row_stride, p.seq - kb * kB, p.head_dim, p.vec_loads);
    __syncthreads();
    warp_product_nt<Tr>(sQ + warp * 16 * Tr::kLdX, sK, sS + warp * 16 * Tr::kLdS);
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = q0 + warp * 16 + r;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = lane + 32 * half;
        const int j = kb * kB + c;
        float prob = 0.f;
        if (i < row_limit && j <= i) {
          prob = expf(score(sS[(warp * 16 + r) * Tr::kLdS + c], i, j) - lse[r]);
        }
        sP[(warp * 16 + r) * Tr::kLdP + c] = from_float<T>(prob);
      }
    }
    __syncwarp();
    acc.template mma<RowMajor, RowMajor, kB>(sP + warp * 16 * Tr::kLdP, Tr::kLdP, sK, Tr::kLdX);
  }

  __syncthreads();  // the staging area overlays K, which other warps may still be reading
  acc.store(sStage + warp * 16 * Tr::kLdAcc, Tr::kLdAcc);
  __syncwarp();
  T* o_bh = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride;
#pragma unroll 1
  for (int r = 0; r < 16; ++r) {
    const int i = q0 + warp * 16 + r;
    if (i < row_limit) {
      for (int d = lane; d < p.head_dim; d += 32) {
        o_bh[i * p.o.row_stride + d] = from_float<T>(sStage[(warp * 16 + r) * Tr::kLdAcc + d]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, Delta_i = dO_i . o_i + sum_j p_ij dp_bias_ij, per (query tile, head, batch). The
// second term (the diagonal's y_i . c_j) needs one pass over the keys ("pass 1" of
// docs/backward.md); without a diagonal the kernel reads no keys. Layout: Q | K | S.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_delta_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kB = Tr::kBlock, kD = Tr::kHeadDim;
  T* sQ = smem_at<T>(0);
  T* sK = smem_at<T>(Tr::kTileX);
  float* sS = smem_at<float>(2 * Tr::kTileX);

  const int b = blockIdx.z, h = blockIdx.y;
  const int qb = p.row_begin / kB + blockIdx.x;
  const int q0 = qb * kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_limit = p.row_end;
  const T* o_bh = head_ptr<T>(p.o, b, h);
  const T* do_bh = head_ptr<T>(p.dout, b, h);
  float* lse_bh = p.lse + b * p.stat_batch_stride + h * p.stat_head_stride;
  float* delta_bh = p.delta + b * p.stat_batch_stride + h * p.stat_head_stride;

  float acc[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int i = q0 + warp * 16 + r;
    float v = 0.f;
    if (i < row_limit) {
      for (int d = lane; d < p.head_dim; d += 32) {
        v += to_float(do_bh[i * p.dout.row_stride + d]) * to_float(o_bh[i * p.o.row_stride + d]);
      }
    }
    acc[r] = v;
  }

  const float* dp_bias = dp_bias_of(p, b, h);
  if (dp_bias != nullptr) {  // uniform over the block
    const T* q_bh = head_ptr<T>(p.q, b, h);
    const T* k_bh = head_ptr<T>(p.k, b, h);
    const ScoreTerms score = score_terms<T>(p, b, h);
    float lse[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = q0 + warp * 16 + r;
      lse[r] = i < row_limit ? lse_bh[i] : 0.f;
    }
    load_tile<T, kB, kD, Tr::kThreads>(sQ, Tr::kLdX, q_bh + q0 * p.q.row_stride, p.q.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
    for (int kb = 0; kb <= qb; ++kb) {
      __syncthreads();
      load_tile<T, kB, kD, Tr::kThreads>(sK, Tr::kLdX, k_bh + kb * kB * p.k.row_stride, p.k.row_stride, p.seq - kb * kB, p.head_dim, p.vec_loads);
      __syncthreads();
      warp_product_nt<Tr>(sQ + warp * 16 * Tr::kLdX, sK, sS + warp * 16 * Tr::kLdS);
      __syncwarp();
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int i = q0 + warp * 16 + r;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int c = lane + 32 * half;
          const int j = kb * kB + c;
          if (i < row_limit && j <= i) {
            const float prob = expf(score(sS[(warp * 16 + r) * Tr::kLdS + c], i, j) - lse[r]);
            acc[r] += prob * dp_bias[(i - p.row_begin) * p.dp_bias.row_stride + j];
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const float total = warp_sum(acc[r]);
    const int i = q0 + warp * 16 + r;
    if (lane == r && i < row_limit) {
      delta_bh[i] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, dQ_i = beta sum_j dS_ij k_j per (query tile, head, batch), no atomics: every dQ row
// is owned by one block. Layout: Q | dO | K | S | dP | dS, the output staging over K...
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dq_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kB = Tr::kBlock, kD = Tr::kHeadDim;
  T* sQ = smem_at<T>(0);
  T* sdO = smem_at<T>(Tr::kTileX);
  T* sK = smem_at<T>(2 * Tr::kTileX);
  float* sS = smem_at<float>(3 * Tr::kTileX);
  float* sdP = smem_at<float>(3 * Tr::kTileX + Tr::kTileS);
  T* sdS = Tr::kIsFloat ? reinterpret_cast<T*>(sdP) : smem_at<T>(3 * Tr::kTileX + 2 * Tr::kTileS);
  float* sStage = smem_at<float>(2 * Tr::kTileX);

  const int b = blockIdx.z, h = blockIdx.y;
  const int qb = p.row_begin / kB + blockIdx.x;
  const int q0 = qb * kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_limit = p.row_end;
  const T* q_bh = head_ptr<T>(p.q, b, h);
  const T* do_bh = head_ptr<T>(p.dout, b, h);
  const T* k_bh = head_ptr<T>(p.k, b, h);
  const ScoreTerms score = score_terms<T>(p, b, h);
  const float* dp_bias = dp_bias_of(p, b, h);
  const float* lse_bh = p.lse + b * p.stat_batch_stride + h * p.stat_head_stride;
  const float* delta_bh = p.delta + b * p.stat_batch_stride + h * p.stat_head_stride;

  load_tile<T, kB, kD, Tr::kThreads>(sQ, Tr::kLdX, q_bh + q0 * p.q.row_stride, p.q.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
  load_tile<T, kB, kD, Tr::kThreads>(sdO, Tr::kLdX, do_bh + q0 * p.dout.row_stride, p.dout.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
  float lse[16], delta[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int i = q0 + warp * 16 + r;
    lse[r] = i < row_limit ? lse_bh[i] : 0.f;
    delta[r] = i < row_limit ? delta_bh[i] : 0.f;
  }

  WarpTile<T, kD> acc;
  acc.zero();
  for (int kb = 0; kb <= qb; ++kb) {
    __syncthreads();
    load_tile<T, kB, kD, Tr::kThreads>(sK, Tr::kLdX, k_bh + kb * kB * p.k.row_stride, p.k.row_stride, p.seq - kb * kB, p.head_dim, p.vec_loads);
    __syncthreads();
    warp_product_nt<Tr>(sQ + warp * 16 * Tr::kLdX, sK, sS + warp * 16 * Tr::kLdS);
    warp_product_nt<Tr>(sdO + warp * 16 * Tr::kLdX, sK, sdP + warp * 16 * Tr::kLdS);
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = q0 + warp * 16 + r;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = lane + 32 * half;
        const int j = kb * kB + c;
        const int idx = (warp * 16 + r) * Tr::kLdS + c;
        float ds = 0.f;
        if (i < row_limit && j <= i) {
          const float prob = expf(score(sS[idx], i, j) - lse[r]);
          float dp = sdP[idx];
          if (dp_bias != nullptr) {
            dp += dp_bias[(i - p.row_begin) * p.dp_bias.row_stride + j];
          }
          ds = p.scale * prob * (dp - delta[r]);
        }
        sdS[(warp * 16 + r) * Tr::kLdP + c] = from_float<T>(ds);
      }
    }
    __syncwarp();
    acc.template mma<RowMajor, RowMajor, kB>(sdS + warp * 16 * Tr::kLdP, Tr::kLdP, sK, Tr::kLdX);
  }

  __syncthreads();
  acc.store(sStage + warp * 16 * Tr::kLdAcc, Tr::kLdAcc);
  __syncwarp();
  float* dq_bh = static_cast<float*>(p.dq.ptr) + b * p.dq.batch_stride + h * p.dq.head_stride;
#pragma unroll 1
  for (int r = 0; r < 16; ++r) {
    const int i = q0 + warp * 16 + r;
    if (i < row_limit) {
      for (int d = lane; d < p.head_dim; d += 32) {
        dq_bh[i * p.dq.row_stride + d] = sStage[(warp * 16 + r) * Tr::kLdAcc + d];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, dK_j += beta sum_i dS_ij q_i + sum_i p_ij dO_i (V = K, so the value gradient lands on
// the keys) per (key tile, head, batch), looping over the query tiles of the launch. Key-block
// outer: each dK row is owned by one block, no atomics; the launches of successive panels and
// steps accumulate into dK in order on the stream. Each warp computes the transposed tiles
// S^T = K Q^T and dP^T = K dO^T for its 16 keys.
// Layout: K | Q | dO | S | dP | P | dS | lse | Delta, the output staging over Q...
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dk_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kB = Tr::kBlock, kD = Tr::kHeadDim;
  constexpr int kOffS = 3 * Tr::kTileX;
  constexpr int kOffdP = kOffS + Tr::kTileS;
  constexpr int kOffP = kOffdP + Tr::kTileS;
  constexpr int kOffdS = kOffP + Tr::kTileP;
  constexpr int kOffStat = kOffdS + Tr::kTileP;
  T* sK = smem_at<T>(0);
  T* sQ = smem_at<T>(Tr::kTileX);
  T* sdO = smem_at<T>(2 * Tr::kTileX);
  float* sS = smem_at<float>(kOffS);
  float* sdP = smem_at<float>(kOffdP);
  T* sP = Tr::kIsFloat ? reinterpret_cast<T*>(sS) : smem_at<T>(kOffP);
  T* sdS = Tr::kIsFloat ? reinterpret_cast<T*>(sdP) : smem_at<T>(kOffdS);
  float* sLse = smem_at<float>(kOffStat);
  float* sDelta = smem_at<float>(kOffStat + Tr::kStat);
  float* sStage = smem_at<float>(Tr::kTileX);

  const int b = blockIdx.z, h = blockIdx.y;
  const int kb = blockIdx.x;
  const int k0 = kb * kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_limit = p.row_end;
  const T* q_bh = head_ptr<T>(p.q, b, h);
  const T* do_bh = head_ptr<T>(p.dout, b, h);
  const T* k_bh = head_ptr<T>(p.k, b, h);
  const ScoreTerms score = score_terms<T>(p, b, h);
  const float* dp_bias = dp_bias_of(p, b, h);
  const float* lse_bh = p.lse + b * p.stat_batch_stride + h * p.stat_head_stride;
  const float* delta_bh = p.delta + b * p.stat_batch_stride + h * p.stat_head_stride;

  load_tile<T, kB, kD, Tr::kThreads>(sK, Tr::kLdX, k_bh + k0 * p.k.row_stride, p.k.row_stride, p.seq - k0, p.head_dim, p.vec_loads);

  WarpTile<T, kD> acc;
  acc.zero();
  const int qb_first = max(kb, p.row_begin / kB);
  const int qb_last = (row_limit - 1) / kB;
  for (int qb = qb_first; qb <= qb_last; ++qb) {
    const int q0 = qb * kB;
    __syncthreads();
    load_tile<T, kB, kD, Tr::kThreads>(sQ, Tr::kLdX, q_bh + q0 * p.q.row_stride, p.q.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
    load_tile<T, kB, kD, Tr::kThreads>(sdO, Tr::kLdX, do_bh + q0 * p.dout.row_stride, p.dout.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
    load_row_stat<kB, Tr::kThreads>(sLse, lse_bh + q0, row_limit - q0);
    load_row_stat<kB, Tr::kThreads>(sDelta, delta_bh + q0, row_limit - q0);
    __syncthreads();
    warp_product_nt<Tr>(sK + warp * 16 * Tr::kLdX, sQ, sS + warp * 16 * Tr::kLdS);
    warp_product_nt<Tr>(sK + warp * 16 * Tr::kLdX, sdO, sdP + warp * 16 * Tr::kLdS);
    __syncwarp();
    // Element e of the warp's 16 x 64 transposed tile: key r = e % 16, query c = e / 16, so each
    // half-warp reads 16 consecutive keys of one panel row (coalesced).
#pragma unroll 4
    for (int it = 0; it < 16 * kB / 32; ++it) {
      const int e = lane + 32 * it;
      const int r = e & 15, c = e >> 4;
      const int j = k0 + warp * 16 + r;
      const int i = q0 + c;
      const int idx = (warp * 16 + r) * Tr::kLdS + c;
      float prob = 0.f, ds = 0.f;
      if (i < row_limit && j <= i) {
        prob = expf(score(sS[idx], i, j) - sLse[c]);
        float dp = sdP[idx];
        if (dp_bias != nullptr) {
          dp += dp_bias[(i - p.row_begin) * p.dp_bias.row_stride + j];
        }
        ds = p.scale * prob * (dp - sDelta[c]);
      }
      const int idx_p = (warp * 16 + r) * Tr::kLdP + c;
      sP[idx_p] = from_float<T>(prob);
      sdS[idx_p] = from_float<T>(ds);
    }
    __syncwarp();
    acc.template mma<RowMajor, RowMajor, kB>(sdS + warp * 16 * Tr::kLdP, Tr::kLdP, sQ, Tr::kLdX);
    acc.template mma<RowMajor, RowMajor, kB>(sP + warp * 16 * Tr::kLdP, Tr::kLdP, sdO, Tr::kLdX);
  }

  __syncthreads();
  acc.store(sStage + warp * 16 * Tr::kLdAcc, Tr::kLdAcc);
  __syncwarp();
  float* dk_bh = static_cast<float*>(p.dk.ptr) + b * p.dk.batch_stride + h * p.dk.head_stride;
#pragma unroll 1
  for (int r = 0; r < 16; ++r) {
    const int j = k0 + warp * 16 + r;
    if (j < p.seq) {
      for (int d = lane; d < p.head_dim; d += 32) {
        dk_bh[j * p.dk.row_stride + d] += sStage[(warp * 16 + r) * Tr::kLdAcc + d];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row-panel tiles of P (and dS = P (dP - Delta) with kGrad), per (key tile, query tile of the
// panel, batch), looping over the heads: summed over heads for a shared diagonal (the only
// thing the D-wide products need), one slice per head for a per-head diagonal. Deterministic,
// no atomics. Layout: Q | K | dO | S | dP | lse | Delta.
template <class Tr, bool kGrad>
__global__ void __launch_bounds__(Tr::kThreads) attention_tile_probs_kernel(const CemAttnParams p) {
  using T = typename Tr::T;
  constexpr int kB = Tr::kBlock, kD = Tr::kHeadDim;
  T* sQ = smem_at<T>(0);
  T* sK = smem_at<T>(Tr::kTileX);
  T* sdO = smem_at<T>(2 * Tr::kTileX);
  float* sS = smem_at<float>(3 * Tr::kTileX);
  float* sdP = smem_at<float>(3 * Tr::kTileX + Tr::kTileS);
  float* sLse = smem_at<float>(3 * Tr::kTileX + 2 * Tr::kTileS);
  float* sDelta = smem_at<float>(3 * Tr::kTileX + 2 * Tr::kTileS + Tr::kStat);

  const int b = blockIdx.z;
  const int qb = p.row_begin / kB + blockIdx.y;
  const int kb = blockIdx.x;
  const int q0 = qb * kB, k0 = kb * kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_limit = p.row_end;  // panel rows end here ...
  const int key_limit = p.row_end;  // ... and so do its keys (causal)
  T* probs_b = static_cast<T*>(p.probs.ptr) + b * p.probs.batch_stride;
  T* dprobs_b = kGrad ? static_cast<T*>(p.dprobs.ptr) + b * p.dprobs.batch_stride : nullptr;

  if (kb > qb) {  // entirely above the diagonal: the panel still needs its zeros
    const int out_heads = p.probs_per_head ? p.heads : 1;
    for (int hh = 0; hh < out_heads; ++hh) {
      for (int e = threadIdx.x; e < kB * kB; e += Tr::kThreads) {
        const int i = q0 + e / kB, j = k0 + e % kB;
        if (i < row_limit && j < key_limit) {
          const int64_t off = hh * p.probs.head_stride + (i - p.row_begin) * p.probs.row_stride + j;
          probs_b[off] = from_float<T>(0.f);
          if constexpr (kGrad) {
            dprobs_b[hh * p.dprobs.head_stride + (i - p.row_begin) * p.dprobs.row_stride + j] = from_float<T>(0.f);
          }
        }
      }
    }
    return;
  }

  float prob_sum[16][2], ds_sum[16][2];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    prob_sum[r][0] = prob_sum[r][1] = 0.f;
    ds_sum[r][0] = ds_sum[r][1] = 0.f;
  }
  for (int h = 0; h < p.heads; ++h) {
    const float* lse_bh = p.lse + b * p.stat_batch_stride + h * p.stat_head_stride;
    __syncthreads();
    load_tile<T, kB, kD, Tr::kThreads>(sQ, Tr::kLdX, head_ptr<T>(p.q, b, h) + q0 * p.q.row_stride, p.q.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
    load_tile<T, kB, kD, Tr::kThreads>(sK, Tr::kLdX, head_ptr<T>(p.k, b, h) + k0 * p.k.row_stride, p.k.row_stride, p.seq - k0, p.head_dim, p.vec_loads);
    load_row_stat<kB, Tr::kThreads>(sLse, lse_bh + q0, row_limit - q0);
    if constexpr (kGrad) {
      const float* delta_bh = p.delta + b * p.stat_batch_stride + h * p.stat_head_stride;
      load_tile<T, kB, kD, Tr::kThreads>(sdO, Tr::kLdX, head_ptr<T>(p.dout, b, h) + q0 * p.dout.row_stride, p.dout.row_stride, row_limit - q0, p.head_dim, p.vec_loads);
      load_row_stat<kB, Tr::kThreads>(sDelta, delta_bh + q0, row_limit - q0);
    }
    __syncthreads();
    warp_product_nt<Tr>(sQ + warp * 16 * Tr::kLdX, sK, sS + warp * 16 * Tr::kLdS);
    if constexpr (kGrad) {
      warp_product_nt<Tr>(sdO + warp * 16 * Tr::kLdX, sK, sdP + warp * 16 * Tr::kLdS);
    }
    __syncwarp();
    const ScoreTerms score = score_terms<T>(p, b, h);
    const float* dp_bias = dp_bias_of(p, b, h);
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = q0 + warp * 16 + r;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = lane + 32 * half;
        const int j = k0 + c;
        const int idx = (warp * 16 + r) * Tr::kLdS + c;
        float prob = 0.f, ds = 0.f;
        if (i < row_limit && j <= i) {
          prob = expf(score(sS[idx], i, j) - sLse[warp * 16 + r]);
          if constexpr (kGrad) {
            float dp = sdP[idx];
            if (dp_bias != nullptr) {
              dp += dp_bias[(i - p.row_begin) * p.dp_bias.row_stride + j];
            }
            ds = prob * (dp - sDelta[warp * 16 + r]);
          }
        }
        if (p.probs_per_head) {
          if (i < row_limit && j < key_limit) {
            probs_b[h * p.probs.head_stride + (i - p.row_begin) * p.probs.row_stride + j] = from_float<T>(prob);
            if constexpr (kGrad) {
              dprobs_b[h * p.dprobs.head_stride + (i - p.row_begin) * p.dprobs.row_stride + j] = from_float<T>(ds);
            }
          }
        } else {
          prob_sum[r][half] += prob;
          ds_sum[r][half] += ds;
        }
      }
    }
  }

  if (!p.probs_per_head) {
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int i = q0 + warp * 16 + r;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int j = k0 + lane + 32 * half;
        if (i < row_limit && j < key_limit) {
          probs_b[(i - p.row_begin) * p.probs.row_stride + j] = from_float<T>(prob_sum[r][half]);
          if constexpr (kGrad) {
            dprobs_b[(i - p.row_begin) * p.dprobs.row_stride + j] = from_float<T>(ds_sum[r][half]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers and the kernel set registered by each generated TU.

template <class Tr>
struct AttentionLaunchers {
  static int tiles_in_launch(const CemAttnParams& p) {
    return ceil_div(p.row_end, Tr::kBlock) - p.row_begin / Tr::kBlock;
  }
  static cudaError_t fwd(const CemAttnParams& p, cudaStream_t s) {
    const dim3 grid(tiles_in_launch(p), p.heads, p.batch);
    return launch_kernel("attention_fwd_kernel", attention_fwd_kernel<Tr>, grid, dim3(Tr::kThreads), Tr::kSmemFwd, Tr::kSmemFwd, s, p);
  }
  static cudaError_t bwd_delta(const CemAttnParams& p, cudaStream_t s) {
    const dim3 grid(tiles_in_launch(p), p.heads, p.batch);
    const int smem = p.dp_bias.ptr != nullptr ? Tr::kSmemDelta : 0;  // without a diagonal: no tiles
    return launch_kernel("attention_bwd_delta_kernel", attention_bwd_delta_kernel<Tr>, grid, dim3(Tr::kThreads), Tr::kSmemDelta, smem, s, p);
  }
  static cudaError_t bwd_dq(const CemAttnParams& p, cudaStream_t s) {
    const dim3 grid(tiles_in_launch(p), p.heads, p.batch);
    return launch_kernel("attention_bwd_dq_kernel", attention_bwd_dq_kernel<Tr>, grid, dim3(Tr::kThreads), Tr::kSmemDq, Tr::kSmemDq, s, p);
  }
  static cudaError_t bwd_dk(const CemAttnParams& p, cudaStream_t s) {
    const dim3 grid(ceil_div(p.row_end, Tr::kBlock), p.heads, p.batch);  // every key tile up to row_end
    return launch_kernel("attention_bwd_dk_kernel", attention_bwd_dk_kernel<Tr>, grid, dim3(Tr::kThreads), Tr::kSmemDk, Tr::kSmemDk, s, p);
  }
  template <bool kGrad>
  static cudaError_t tile_probs(const CemAttnParams& p, cudaStream_t s) {
    const dim3 grid(ceil_div(p.row_end, Tr::kBlock), tiles_in_launch(p), p.batch);
    return launch_kernel(kGrad ? "attention_tile_probs_grad_kernel" : "attention_tile_probs_kernel", attention_tile_probs_kernel<Tr, kGrad>,
                         grid, dim3(Tr::kThreads), Tr::kSmemProbs, Tr::kSmemProbs, s, p);
  }
};

template <typename T, int kHeadDim>
AttentionKernelSet make_attention_kernel_set() {
  using Tr = AttnTraits<T, kHeadDim>;
  using L = AttentionLaunchers<Tr>;
  AttentionKernelSet set;
  set.max_head_dim = kHeadDim;
  set.tile_rows = Tr::kBlock;
  set.smem_bytes = Tr::kSmemMax;
  set.fwd = &L::fwd;
  set.tile_probs = &L::template tile_probs<false>;
  set.tile_probs_grad = &L::template tile_probs<true>;
  set.bwd_delta = &L::bwd_delta;
  set.bwd_dk = &L::bwd_dk;
  set.bwd_dq = &L::bwd_dq;
  return set;
}

}  // namespace cem::cuda

// One line per generated TU: compiles the kernels of (T, head-dim bucket) and registers them.
#define CEM_INSTANTIATE_ATTENTION(T, HEAD_DIM, DTYPE)                                              \
  namespace {                                                                                      \
  const bool cem_attention_kernels_registered =                                                    \
      ::cem::cuda::register_attention_kernels(DTYPE, ::cem::cuda::make_attention_kernel_set<T, HEAD_DIM>()); \
  }
