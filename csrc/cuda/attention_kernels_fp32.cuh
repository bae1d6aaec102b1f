// The float32 attention kernels of one head-dim bucket: exact FMA products (no TF32), so that
// float32 inputs meet the 1e-4 contract; bf16/fp16 run the tensor-core kernels
// (attention_*_tc.cuh). Included only by attention_kernel_set.cuh.
//
// Tiles are kBlock = 64 query rows x 64 keys; each of the 4 warps owns 16 rows of a tile, so the
// softmax arithmetic between the matrix products needs only __syncwarp. Raw products are staged
// in shared memory, probabilities and dS overwrite them in place, and the output accumulators
// stay in registers. All per-head work is Dh wide; the D-wide diagonal terms arrive as float32
// row panels (score_bias, dp_bias).
#pragma once

#include <cmath>

#include "cuda/attention_common.cuh"
#include "cuda/kernel_registry.h"
#include "cuda/tile_ops.cuh"

namespace cem::cuda {

template <int kHeadDim_>
struct Fp32Traits {
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim of the tiles
  static constexpr int kBlock = 64;           // query rows and keys per tile
  static constexpr int kWarps = kBlock / 16;  // each warp owns 16 rows of a tile
  static constexpr int kThreads = kWarps * 32;
  // ld % 32 == 4 keeps WarpTile's shared-memory reads free of bank conflicts.
  static constexpr int kLdX = kHeadDim + 4;  // q, k, dO tiles, and the staging of an output tile
  static constexpr int kLdS = kBlock + 4;    // scores and dP, then P and dS in place

  static constexpr int kTileX = round_up_128(kBlock * kLdX * 4);
  static constexpr int kTileS = round_up_128(kBlock * kLdS * 4);
  static constexpr int kStat = round_up_128(kBlock * 4);

  // Dynamic shared memory of each kernel (layouts in the kernels below). An output tile is
  // staged over the streamed input tile, which has its size.
  static constexpr int kSmemFwd = 2 * kTileX + kTileS;
  static constexpr int kSmemDelta = 2 * kTileX + kTileS;
  static constexpr int kSmemDq = 3 * kTileX + 2 * kTileS;
  static constexpr int kSmemDk = 3 * kTileX + 2 * kTileS + 2 * kStat;
  static constexpr int kSmemProbs = 3 * kTileX + 2 * kTileS + 2 * kStat;
  static constexpr int kSmemMax = cmax(kSmemDk, kSmemProbs);

  static_assert(kHeadDim % 16 == 0, "head-dim bucket must be a multiple of 16");
  static_assert(kSmemMax <= 160 * 1024, "tile layout exceeds the sm_80 shared-memory limit");
};

// Element (i, j) of the (batch, head) slice of a float32 row panel; 0 without a panel.
struct PanelTerm {
  const float* ptr;
  int64_t row_stride;
  int row_begin;

  __device__ __forceinline__ PanelTerm(const CemPanel& panel, const CemAttnParams& p, int b, int h)
      : ptr(panel_ptr(panel, b, h)), row_stride(panel.row_stride), row_begin(p.row_begin) {}
  __device__ __forceinline__ bool present() const { return ptr != nullptr; }
  __device__ __forceinline__ float operator()(int i, int j) const {
    return ptr != nullptr ? ptr[(i - row_begin) * row_stride + j] : 0.f;
  }
};

// Everything that turns a raw Q.K product into the score s_ij of one (batch, head).
struct ScoreTerms {
  float scale, slope;
  PanelTerm bias;

  __device__ __forceinline__ ScoreTerms(const CemAttnParams& p, int b, int h)
      : scale(p.scale), slope(alibi_slope<float>(p, h)), bias(p.score_bias, p, b, h) {}
  __device__ __forceinline__ float operator()(float raw, int i, int j) const {
    return scale * raw + slope * static_cast<float>(j - i) + bias(i, j);  // ALiBi: -m (i - j)
  }
};

// Rows [row0, row0 + kBlock) of the (b, h) slice of a head tensor into a shared tile, zero past
// row_limit and past the head dim.
template <class Tr>
__device__ __forceinline__ void load_rows(
    float* dst, const CemHeadTensor& t, const CemAttnParams& p, int b, int h, int row0, int row_limit) {
  load_tile<float, Tr::kBlock, Tr::kHeadDim, Tr::kThreads>(
      dst, Tr::kLdX, head_ptr<float>(t, b, h) + row0 * t.row_stride, t.row_stride, row_limit - row0, p.head_dim,
      p.vec_loads);
}

// out (16 x kBlock, this warp's rows) = A_w (16 x kHeadDim) * B^T, with B a kBlock x kHeadDim
// tile: scores Q K^T, dP = dO K^T, and their transposes K Q^T, K dO^T.
template <class Tr>
__device__ __forceinline__ void warp_product_nt(const float* a_tile, const float* b_tile, float* out_tile) {
  const int warp = threadIdx.x >> 5;
  WarpTile<Tr::kBlock> tile;
  tile.zero();
  tile.template mma<RowMajor, ColMajor, Tr::kHeadDim>(a_tile + warp * 16 * Tr::kLdX, Tr::kLdX, b_tile, Tr::kLdX);
  tile.store(out_tile + warp * 16 * Tr::kLdS, Tr::kLdS);
}

// acc += this warp's 16 rows of a kLdS tile (P or dS) times a kBlock x kHeadDim tile.
template <class Tr>
__device__ __forceinline__ void warp_product_nn(WarpTile<Tr::kHeadDim>& acc, const float* w_tile, const float* b_tile) {
  const int warp = threadIdx.x >> 5;
  acc.template mma<RowMajor, RowMajor, Tr::kBlock>(w_tile + warp * 16 * Tr::kLdS, Tr::kLdS, b_tile, Tr::kLdX);
}

// Calls f(r, half, i, j, live, at) for the elements a lane owns of its warp's 16 x kBlock tile:
// row r (query i = i0 + r), column lane + 32 half (key j), `at` its offset in a kLdS tile, live
// when i is a row of the launch and j <= i.
template <class Tr, class F>
__device__ __forceinline__ void for_each_warp_element(int i0, int j0, int row_limit, F&& f) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = lane + 32 * half;
      const int i = i0 + r, j = j0 + c;
      f(r, half, i, j, i < row_limit && j <= i, (warp * 16 + r) * Tr::kLdS + c);
    }
  }
}

// This warp's 16 values of a per-row statistic (lse, Delta); 0 past the launch's rows.
__device__ __forceinline__ void load_warp_stat(float (&out)[16], const float* stat, int i0, int row_limit) {
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    out[r] = i0 + r < row_limit ? stat[i0 + r] : 0.f;
  }
}

// Hands put(row, d, value) this warp's accumulator rows row0 + r < row_limit, staged in `stage`,
// a kBlock x kLdX tile no warp reads any more once every warp is here.
template <class Tr, class Put>
__device__ __forceinline__ void put_warp_rows(
    const WarpTile<Tr::kHeadDim>& acc, float* stage, int row0, int row_limit, int head_dim, Put&& put) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* rows = stage + warp * 16 * Tr::kLdX;
  __syncthreads();
  acc.store(rows, Tr::kLdX);
  __syncwarp();
#pragma unroll 1
  for (int r = 0; r < 16; ++r) {
    if (row0 + r < row_limit) {
      for (int d = lane; d < head_dim; d += 32) {
        put(row0 + r, d, rows[r * Tr::kLdX + d]);
      }
    }
  }
}

struct NoOp {
  __device__ __forceinline__ void operator()() const {}
};

// Grid coordinates of the kernels over query tiles: (query tile of the launch, head, batch).
template <class Tr>
struct QueryTile {
  int b, h, qb, q0, i0;  // i0: this warp's first row

  __device__ __forceinline__ explicit QueryTile(const CemAttnParams& p)
      : b(blockIdx.z), h(blockIdx.y), qb(p.row_begin / Tr::kBlock + blockIdx.x), q0(qb * Tr::kBlock),
        i0(q0 + (threadIdx.x >> 5) * 16) {}

  // For each causal key tile: the tile into sK once every warp is done with the previous one,
  // products() stages this warp's raw products, element(r, half, i, j, live, at) visits them
  // (for_each_warp_element), then after() runs.
  template <class Products, class Element, class After = NoOp>
  __device__ __forceinline__ void sweep_keys(
      const CemAttnParams& p, float* sK, Products&& products, Element&& element, After&& after = After{}) const {
    for (int kb = 0; kb <= qb; ++kb) {
      __syncthreads();
      load_rows<Tr>(sK, p.k, p, b, h, kb * Tr::kBlock, p.seq);
      __syncthreads();
      products();
      __syncwarp();
      for_each_warp_element<Tr>(i0, kb * Tr::kBlock, p.row_end, element);
      after();
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward: per (query tile, head, batch). Pass 1 finds each row's log-sum-exp, pass 2 forms the
// normalized probabilities and o = P K (values are the keys), so the output accumulator never
// needs rescaling and stays in registers. Layout: Q | K (then the output staging) | S (then P).
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_kernel(const CemAttnParams p) {
  float* sQ = smem_at<float>(0);
  float* sK = smem_at<float>(Tr::kTileX);
  float* sS = smem_at<float>(2 * Tr::kTileX);
  const QueryTile<Tr> t(p);
  const ScoreTerms score(p, t.b, t.h);
  load_rows<Tr>(sQ, p.q, p, t.b, t.h, t.q0, p.row_end);

  // Pass 1: each lane keeps an online (max, sum) per row over its own columns; one merge at the end.
  float row_max[16], row_sum[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const auto scores = [&] { warp_product_nt<Tr>(sQ, sK, sS); };
  t.sweep_keys(p, sK, scores, [&](int r, int, int i, int j, bool live, int at) {
    if (live) {
      const float s = score(sS[at], i, j);
      if (s > row_max[r]) {
        row_sum[r] = row_sum[r] * expf(row_max[r] - s) + 1.f;
        row_max[r] = s;
      } else {
        row_sum[r] += expf(s - row_max[r]);
      }
    }
  });
  float lse[16];
  float* lse_bh = stat_ptr(p.lse, p, t.b, t.h);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const float m = warp_max(row_max[r]);
    const float l = warp_sum(row_max[r] == -INFINITY ? 0.f : row_sum[r] * expf(row_max[r] - m));
    lse[r] = m + logf(l);  // rows past the end: -inf, never used
    if (lane == r && t.i0 + r < p.row_end) {
      lse_bh[t.i0 + r] = lse[r];
    }
  }

  // Pass 2: o = sum_j p_ij k_j with p already normalized.
  WarpTile<Tr::kHeadDim> acc;
  acc.zero();
  t.sweep_keys(
      p, sK, scores,
      [&](int r, int, int i, int j, bool live, int at) { sS[at] = live ? expf(score(sS[at], i, j) - lse[r]) : 0.f; },
      [&] {
        __syncwarp();
        warp_product_nn<Tr>(acc, sS, sK);
      });

  float* o_bh = head_ptr_mut<float>(p.o, t.b, t.h);
  put_warp_rows<Tr>(acc, sK, t.i0, p.row_end, p.head_dim,
                    [&](int i, int d, float v) { o_bh[i * p.o.row_stride + d] = v; });
}

// ---------------------------------------------------------------------------------------------
// Backward, Delta_i = dO_i . o_i + sum_j p_ij dp_bias_ij, per (query tile, head, batch). The
// second term (the diagonal's y_i . c_j) needs one pass over the keys ("pass 1" of
// docs/backward.md); without a diagonal the kernel reads no keys. Layout: Q | K | S.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_delta_kernel(const CemAttnParams p) {
  float* sQ = smem_at<float>(0);
  float* sK = smem_at<float>(Tr::kTileX);
  float* sS = smem_at<float>(2 * Tr::kTileX);
  const QueryTile<Tr> t(p);
  const int lane = threadIdx.x & 31;
  float acc[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    acc[r] = partial_dout_dot_o<float>(p, t.b, t.h, t.i0 + r, lane, 32);
  }

  const PanelTerm dp_bias(p.dp_bias, p, t.b, t.h);
  if (dp_bias.present()) {  // uniform over the block
    const ScoreTerms score(p, t.b, t.h);
    float lse[16];
    load_warp_stat(lse, stat_ptr(p.lse, p, t.b, t.h), t.i0, p.row_end);
    load_rows<Tr>(sQ, p.q, p, t.b, t.h, t.q0, p.row_end);
    t.sweep_keys(p, sK, [&] { warp_product_nt<Tr>(sQ, sK, sS); }, [&](int r, int, int i, int j, bool live, int at) {
      if (live) {
        acc[r] += expf(score(sS[at], i, j) - lse[r]) * dp_bias(i, j);
      }
    });
  }

  float* delta_bh = stat_ptr(p.delta, p, t.b, t.h);
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == r && t.i0 + r < p.row_end) {
      delta_bh[t.i0 + r] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, dQ_i = beta sum_j dS_ij k_j per (query tile, head, batch), no atomics: every dQ row
// is owned by one block. Layout: Q | dO | K (then the output staging) | S | dP (then dS).
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dq_kernel(const CemAttnParams p) {
  float* sQ = smem_at<float>(0);
  float* sdO = smem_at<float>(Tr::kTileX);
  float* sK = smem_at<float>(2 * Tr::kTileX);
  float* sS = smem_at<float>(3 * Tr::kTileX);
  float* sdP = smem_at<float>(3 * Tr::kTileX + Tr::kTileS);
  const QueryTile<Tr> t(p);
  const ScoreTerms score(p, t.b, t.h);
  const PanelTerm dp_bias(p.dp_bias, p, t.b, t.h);

  load_rows<Tr>(sQ, p.q, p, t.b, t.h, t.q0, p.row_end);
  load_rows<Tr>(sdO, p.dout, p, t.b, t.h, t.q0, p.row_end);
  float lse[16], delta[16];
  load_warp_stat(lse, stat_ptr(p.lse, p, t.b, t.h), t.i0, p.row_end);
  load_warp_stat(delta, stat_ptr(p.delta, p, t.b, t.h), t.i0, p.row_end);

  WarpTile<Tr::kHeadDim> acc;
  acc.zero();
  t.sweep_keys(
      p, sK,
      [&] {
        warp_product_nt<Tr>(sQ, sK, sS);
        warp_product_nt<Tr>(sdO, sK, sdP);
      },
      [&](int r, int, int i, int j, bool live, int at) {
        float ds = 0.f;
        if (live) {
          const float prob = expf(score(sS[at], i, j) - lse[r]);
          ds = p.scale * prob * (sdP[at] + dp_bias(i, j) - delta[r]);
        }
        sdP[at] = ds;
      },
      [&] {
        __syncwarp();
        warp_product_nn<Tr>(acc, sdP, sK);
      });

  float* dq_bh = head_ptr_mut<float>(p.dq, t.b, t.h);
  put_warp_rows<Tr>(acc, sK, t.i0, p.row_end, p.head_dim,
                    [&](int i, int d, float v) { dq_bh[i * p.dq.row_stride + d] = v; });
}

// ---------------------------------------------------------------------------------------------
// Backward, dK_j += beta sum_i dS_ij q_i + sum_i p_ij dO_i (V = K, so the value gradient lands on
// the keys) per (key tile, head, batch), looping over the query tiles of the launch. Key-block
// outer: each dK row is owned by one block, no atomics; the launches of successive panels and
// steps accumulate into dK in order on the stream. Each warp computes the transposed tiles
// S^T = K Q^T and dP^T = K dO^T for its 16 keys.
// Layout: K | Q (then the output staging) | dO | S (then P) | dP (then dS) | lse | Delta.
template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dk_kernel(const CemAttnParams p) {
  constexpr int kB = Tr::kBlock;
  constexpr int kOffStat = 3 * Tr::kTileX + 2 * Tr::kTileS;
  float* sK = smem_at<float>(0);
  float* sQ = smem_at<float>(Tr::kTileX);
  float* sdO = smem_at<float>(2 * Tr::kTileX);
  float* sS = smem_at<float>(3 * Tr::kTileX);
  float* sdP = smem_at<float>(3 * Tr::kTileX + Tr::kTileS);
  float* sLse = smem_at<float>(kOffStat);
  float* sDelta = smem_at<float>(kOffStat + Tr::kStat);

  const int b = blockIdx.z, h = blockIdx.y;
  const int k0 = blockIdx.x * kB;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const ScoreTerms score(p, b, h);
  const PanelTerm dp_bias(p.dp_bias, p, b, h);
  const float* lse_bh = stat_ptr(p.lse, p, b, h);
  const float* delta_bh = stat_ptr(p.delta, p, b, h);

  load_rows<Tr>(sK, p.k, p, b, h, k0, p.seq);

  WarpTile<Tr::kHeadDim> acc;
  acc.zero();
  const int qb_first = max(static_cast<int>(blockIdx.x), p.row_begin / kB);
  const int qb_last = (p.row_end - 1) / kB;
  for (int qb = qb_first; qb <= qb_last; ++qb) {
    const int q0 = qb * kB;
    __syncthreads();
    load_rows<Tr>(sQ, p.q, p, b, h, q0, p.row_end);
    load_rows<Tr>(sdO, p.dout, p, b, h, q0, p.row_end);
    load_row_stat<kB, Tr::kThreads>(sLse, lse_bh + q0, p.row_end - q0);
    load_row_stat<kB, Tr::kThreads>(sDelta, delta_bh + q0, p.row_end - q0);
    __syncthreads();
    warp_product_nt<Tr>(sK, sQ, sS);
    warp_product_nt<Tr>(sK, sdO, sdP);
    __syncwarp();
    // Element e of the warp's 16 x 64 transposed tile: key r = e % 16, query c = e / 16, so each
    // half-warp reads 16 consecutive keys of one panel row (coalesced).
#pragma unroll 4
    for (int it = 0; it < 16 * kB / 32; ++it) {
      const int e = lane + 32 * it;
      const int r = e & 15, c = e >> 4;
      const int j = k0 + warp * 16 + r;
      const int i = q0 + c;
      const int at = (warp * 16 + r) * Tr::kLdS + c;
      float prob = 0.f, ds = 0.f;
      if (i < p.row_end && j <= i) {
        prob = expf(score(sS[at], i, j) - sLse[c]);
        ds = p.scale * prob * (sdP[at] + dp_bias(i, j) - sDelta[c]);
      }
      sS[at] = prob;
      sdP[at] = ds;
    }
    __syncwarp();
    warp_product_nn<Tr>(acc, sdP, sQ);
    warp_product_nn<Tr>(acc, sS, sdO);
  }

  float* dk_bh = head_ptr_mut<float>(p.dk, b, h);
  const bool overwrite = k0 >= p.dk_overwrite_from;  // the first contribution to these keys
  put_warp_rows<Tr>(acc, sQ, k0 + warp * 16, p.seq, p.head_dim, [&](int j, int d, float v) {
    float* cell = dk_bh + j * p.dk.row_stride + d;
    *cell = overwrite ? v : *cell + v;
  });
}

// ---------------------------------------------------------------------------------------------
// Row-panel tiles of P (and dS = P (dP - Delta) with kGrad), per (key tile, query tile of the
// panel, batch), looping over the heads: summed over heads for a shared diagonal (the only
// thing the D-wide products need), one slice per head for a per-head diagonal. Deterministic,
// no atomics. Layout: Q | K | dO | S | dP | lse | Delta.
template <class Tr, bool kGrad>
__global__ void __launch_bounds__(Tr::kThreads) attention_tile_probs_kernel(const CemAttnParams p) {
  constexpr int kB = Tr::kBlock;
  constexpr int kOffStat = 3 * Tr::kTileX + 2 * Tr::kTileS;
  float* sQ = smem_at<float>(0);
  float* sK = smem_at<float>(Tr::kTileX);
  float* sdO = smem_at<float>(2 * Tr::kTileX);
  float* sS = smem_at<float>(3 * Tr::kTileX);
  float* sdP = smem_at<float>(3 * Tr::kTileX + Tr::kTileS);
  float* sLse = smem_at<float>(kOffStat);
  float* sDelta = smem_at<float>(kOffStat + Tr::kStat);

  const int b = blockIdx.z;
  const int qb = p.row_begin / kB + blockIdx.y;
  const int kb = blockIdx.x;
  const int q0 = qb * kB, k0 = kb * kB;
  const int i0 = q0 + (threadIdx.x >> 5) * 16;
  const int key_limit = p.row_end;  // the panel's keys end with its rows (causal)
  // Element (i, j) of head hh's slice (or the head sum's) of the P and dS panels.
  const auto panel_at = [&](const CemPanel& panel, int hh, int i, int j) {
    return static_cast<float*>(panel.ptr) + b * panel.batch_stride + hh * panel.head_stride +
           (i - p.row_begin) * panel.row_stride + j;
  };

  if (kb > qb) {  // entirely above the diagonal: the panel still needs its zeros
    const int out_heads = p.probs_per_head ? p.heads : 1;
    for (int hh = 0; hh < out_heads; ++hh) {
      for (int e = threadIdx.x; e < kB * kB; e += Tr::kThreads) {
        const int i = q0 + e / kB, j = k0 + e % kB;
        if (i < p.row_end && j < key_limit) {
          *panel_at(p.probs, hh, i, j) = 0.f;
          if constexpr (kGrad) {
            *panel_at(p.dprobs, hh, i, j) = 0.f;
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
  const int stat_row = (threadIdx.x >> 5) * 16;  // this warp's first row in sLse and sDelta
  for (int h = 0; h < p.heads; ++h) {
    __syncthreads();
    load_rows<Tr>(sQ, p.q, p, b, h, q0, p.row_end);
    load_rows<Tr>(sK, p.k, p, b, h, k0, p.seq);
    load_row_stat<kB, Tr::kThreads>(sLse, stat_ptr(p.lse, p, b, h) + q0, p.row_end - q0);
    if constexpr (kGrad) {
      load_rows<Tr>(sdO, p.dout, p, b, h, q0, p.row_end);
      load_row_stat<kB, Tr::kThreads>(sDelta, stat_ptr(p.delta, p, b, h) + q0, p.row_end - q0);
    }
    __syncthreads();
    warp_product_nt<Tr>(sQ, sK, sS);
    if constexpr (kGrad) {
      warp_product_nt<Tr>(sdO, sK, sdP);
    }
    __syncwarp();
    const ScoreTerms score(p, b, h);
    const PanelTerm dp_bias(p.dp_bias, p, b, h);
    for_each_warp_element<Tr>(i0, k0, p.row_end, [&](int r, int half, int i, int j, bool live, int at) {
      float prob = 0.f, ds = 0.f;
      if (live) {
        prob = expf(score(sS[at], i, j) - sLse[stat_row + r]);
        if constexpr (kGrad) {
          ds = prob * (sdP[at] + dp_bias(i, j) - sDelta[stat_row + r]);
        }
      }
      if (!p.probs_per_head) {
        prob_sum[r][half] += prob;
        ds_sum[r][half] += ds;
      } else if (i < p.row_end && j < key_limit) {
        *panel_at(p.probs, h, i, j) = prob;
        if constexpr (kGrad) {
          *panel_at(p.dprobs, h, i, j) = ds;
        }
      }
    });
  }

  if (!p.probs_per_head) {
    for_each_warp_element<Tr>(i0, k0, p.row_end, [&](int r, int half, int i, int j, bool, int) {
      if (i < p.row_end && j < key_limit) {
        *panel_at(p.probs, 0, i, j) = prob_sum[r][half];
        if constexpr (kGrad) {
          *panel_at(p.dprobs, 0, i, j) = ds_sum[r][half];
        }
      }
    });
  }
}

}  // namespace cem::cuda
