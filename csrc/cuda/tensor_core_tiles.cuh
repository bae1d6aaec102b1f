// Tensor-core building blocks of the bf16/fp16 attention kernels: XOR-swizzled shared-memory
// tiles filled by cp.async, and warp-level m16n8k16 products whose operands come from those tiles
// by ldmatrix or from registers. Fragment layouts are the PTX ISA's (cuda/primitives.cuh):
// a warp's C/D fragment of a 16 x 8n block holds, in lane (g = lane / 4, t = lane % 4), rows g and
// g + 8 and columns 2t, 2t + 1 of every 8-column block; two such blocks make one 16-column A
// fragment, so probabilities go from an accumulator straight into the next product.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/device_runtime.cuh"
#include "cuda/primitives.cuh"

namespace cem::cuda::tc {

// A kRows x kDim tile of 16-bit elements, rows of kDim / 8 chunks of 16 bytes. Chunk c of row r
// sits at chunk c ^ (r % 8): the 8 rows one ldmatrix reads fall in 8 different bank groups.
template <int kRows, int kDim>
struct SwizzledTile {
  static_assert(kDim % 64 == 0, "a swizzled row needs at least 8 chunks of 16 bytes");
  static constexpr int kChunks = kDim / 8;
  static constexpr int kBytes = kRows * kDim * 2;

  __device__ __forceinline__ static int offset(int row, int chunk) { return (row * kChunks + (chunk ^ (row & 7))) * 8; }
};

template <typename T>
__device__ __forceinline__ uint16_t bits_of(T v) {
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return T(0.f);
}

// Rows [0, rows_valid) and columns [0, cols_valid) of a tile starting at `src` (row stride in
// elements) into `tile`; the rest zero-filled (products read whole tiles, and garbage times a
// zero probability can still be NaN). With `async`, 16-byte cp.async (the caller commits and
// waits); otherwise plain element copies (rows that are not 16-byte aligned).
template <class Tile, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t row_stride, int rows_valid, int cols_valid,
                                          bool async) {
  constexpr int kRows = Tile::kBytes / (Tile::kChunks * 16);
  for (int chunk = threadIdx.x; chunk < kRows * Tile::kChunks; chunk += kThreads) {
    const int r = chunk / Tile::kChunks, c = chunk % Tile::kChunks;
    T* dst = tile + Tile::offset(r, c);
    const int valid = r < rows_valid ? min(max(cols_valid - 8 * c, 0), 8) : 0;
    if (async) {
      // A fully masked chunk still gets a (zero-byte) copy, from the tile's own start.
      const T* from = valid > 0 ? src + r * row_stride + 8 * c : src;
      ptx::cp_async<16>(dst, from, 2 * valid);
    } else {
      for (int e = 0; e < 8; ++e) {
        dst[e] = e < valid ? src[r * row_stride + 8 * c + e] : zero_value<T>();
      }
    }
  }
}

// kRows float32 row values (lse, Delta) into shared memory; 0 past rows_valid.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_row_values(float* dst, const float* src, int rows_valid) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    dst[r] = r < rows_valid ? src[r] : 0.f;
  }
}

// kRows x kCols float32 values of a row panel (score biases) into a plain shared tile, by 16-byte
// cp.async where the panel rows allow it; zero outside rows_valid x cols_valid.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_float_tile(float* tile, const float* src, int64_t row_stride, int rows_valid,
                                                int cols_valid, bool async) {
  constexpr int kChunks = kCols / 4;
  for (int chunk = threadIdx.x; chunk < kRows * kChunks; chunk += kThreads) {
    const int r = chunk / kChunks, c = chunk % kChunks;
    float* dst = tile + r * kCols + 4 * c;
    const int valid = r < rows_valid ? min(max(cols_valid - 4 * c, 0), 4) : 0;
    if (async) {
      ptx::cp_async<16>(dst, valid > 0 ? src + r * row_stride + 4 * c : src, 4 * valid);
    } else {
      for (int e = 0; e < 4; ++e) {
        dst[e] = e < valid ? src[r * row_stride + 4 * c + e] : 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fragment loads by ldmatrix.x4: lane l names row l % 8 of matrix l / 8.

// A fragment of rows [row0, row0 + 16) x columns [16 kk, 16 kk + 16) of a row-major tile.
template <class Tile, typename T>
__device__ __forceinline__ void load_a(ptx::FragA& a, const T* tile, int row0, int kk) {
  const int lane = threadIdx.x & 31, m = lane / 8, r = lane % 8;
  ptx::ldmatrix<4>(a.x, tile + Tile::offset(row0 + r + 8 * (m % 2), 2 * kk + m / 2));
}

// B fragments of two 8-column blocks [n0, n0 + 16) for A x tile^T, where the tile's rows are the
// columns of the product (keys of Q K^T): k runs along the tile's rows.
template <class Tile, typename T>
__device__ __forceinline__ void load_b_rows(ptx::FragB& b0, ptx::FragB& b1, const T* tile, int n0, int kk) {
  const int lane = threadIdx.x & 31, m = lane / 8, r = lane % 8;
  uint32_t regs[4];
  ptx::ldmatrix<4>(regs, tile + Tile::offset(n0 + r + 8 * (m / 2), 2 * kk + m % 2));
  b0.x[0] = regs[0];
  b0.x[1] = regs[1];
  b1.x[0] = regs[2];
  b1.x[1] = regs[3];
}

// B fragments of two 8-column blocks [n0, n0 + 16) of the tile itself for A x tile, k running
// down the tile's rows [16 kk, 16 kk + 16) (values V = K in P V, Q in dS Q).
template <class Tile, typename T>
__device__ __forceinline__ void load_b_cols(ptx::FragB& b0, ptx::FragB& b1, const T* tile, int n0, int kk) {
  const int lane = threadIdx.x & 31, m = lane / 8, r = lane % 8;
  uint32_t regs[4];
  ptx::ldmatrix<4, true>(regs, tile + Tile::offset(16 * kk + r + 8 * (m % 2), n0 / 8 + m / 2));
  b0.x[0] = regs[0];
  b0.x[1] = regs[1];
  b1.x[0] = regs[2];
  b1.x[1] = regs[3];
}

// ---------------------------------------------------------------------------------------------
// Accumulator blocks and products.

// A warp's 16 x (8 kN) float32 accumulator: kN fragments of 16 x 8.
template <int kN>
struct Accumulator {
  ptx::FragC c[kN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) c[n].x[i] = 0.f;
    }
  }
};

// acc (16 x 8 kN) += A (16 x 16 kK fragments in registers) x B from `tile`: with kTileRowsAreN
// B = tile^T (tile rows [0, 8 kN), columns [0, 16 kK)), else B = tile (tile rows [0, 16 kK),
// columns [0, 8 kN)).
template <bool kTileRowsAreN, typename T, class Tile, int kK, int kN>
__device__ __forceinline__ void mma_a_tile(Accumulator<kN>& acc, const ptx::FragA (&a)[kK], const T* tile) {
  static_assert(kN % 2 == 0, "B fragments come in pairs");
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      ptx::FragB b0, b1;
      if constexpr (kTileRowsAreN) {
        load_b_rows<Tile>(b0, b1, tile, 8 * n, kk);
      } else {
        load_b_cols<Tile>(b0, b1, tile, 8 * n, kk);
      }
      ptx::mma_m16n8k16<T>(acc.c[n], a[kk], b0, acc.c[n]);
      ptx::mma_m16n8k16<T>(acc.c[n + 1], a[kk], b1, acc.c[n + 1]);
    }
  }
}

// acc += A x tile^T: scores Q K^T from a key tile.
template <typename T, class Tile, int kK, int kN>
__device__ __forceinline__ void mma_a_rows(Accumulator<kN>& acc, const ptx::FragA (&a)[kK], const T* tile) {
  mma_a_tile<true, T, Tile>(acc, a, tile);
}

// acc += A x tile: P K, dS K, dS^T Q from a row tile.
template <typename T, class Tile, int kK, int kN>
__device__ __forceinline__ void mma_a_cols(Accumulator<kN>& acc, const ptx::FragA (&a)[kK], const T* tile) {
  mma_a_tile<false, T, Tile>(acc, a, tile);
}

template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  return static_cast<uint32_t>(bits_of(a)) | static_cast<uint32_t>(bits_of(b)) << 16;
}

// The A fragments (16 x 16 each) of a 16 x (8 kN) accumulator, rounded to T: blocks 2k and
// 2k + 1 of the accumulator are columns [16 k, 16 k + 16) of the operand.
template <typename T, int kN>
__device__ __forceinline__ void to_a_fragments(ptx::FragA (&a)[kN / 2], const Accumulator<kN>& acc) {
#pragma unroll
  for (int k = 0; k < kN / 2; ++k) {
    const ptx::FragC& lo = acc.c[2 * k];
    const ptx::FragC& hi = acc.c[2 * k + 1];
    a[k].x[0] = pack<T>(lo.x[0], lo.x[1]);
    a[k].x[1] = pack<T>(lo.x[2], lo.x[3]);
    a[k].x[2] = pack<T>(hi.x[0], hi.x[1]);
    a[k].x[3] = pack<T>(hi.x[2], hi.x[3]);
  }
}

// Position of element i (< 4) of block n of a warp's 16 x (8 kN) accumulator.
__device__ __forceinline__ int frag_row(int i) { return ((threadIdx.x & 31) >> 2) + 8 * (i >> 1); }
__device__ __forceinline__ int frag_col(int n, int i) { return 8 * n + 2 * (threadIdx.x & 3) + (i & 1); }

// Reductions over the 4 lanes that share a row of an accumulator.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace cem::cuda::tc
