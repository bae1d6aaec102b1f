// Device building blocks of the attention kernels: dtype conversions, warp reductions, and for the
// float32 kernels masked global -> shared tile loads and a warp-level 16 x N exact-FMA product
// kept in registers (the bf16/fp16 kernels use tensor_core_tiles.cuh).
#pragma once

#include "cuda/device_runtime.cuh"

#include <cstdint>
#include <type_traits>

namespace cem::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Copies a kRows x kCols tile whose first row starts at `src` (row stride `row_stride`, unit
// column stride) into shared memory with leading dimension `ld`. Rows >= rows_valid and columns
// >= cols_valid are zero-filled: the tensor-core products read the whole tile, and stale values
// there (even multiplied by a zero probability) could be NaN.
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(
    T* __restrict__ smem, int ld, const T* __restrict__ src, int64_t row_stride, int rows_valid, int cols_valid,
    bool vec_ok) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kCols % kVec == 0, "tile width must be a multiple of a 16-byte vector");
  constexpr int kChunksPerRow = kCols / kVec;
  for (int chunk = threadIdx.x; chunk < kRows * kChunksPerRow; chunk += kThreads) {
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * kVec;
    T* dst = smem + r * ld + c;
    if (r < rows_valid && vec_ok && c + kVec <= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dst[e] = (r < rows_valid && c + e < cols_valid) ? src[r * row_stride + c + e] : from_float<T>(0.f);
      }
    }
  }
}

// Loads kRows values of a per-row statistic (lse or Delta) into shared memory; 0 past the end so
// that masked rows never produce inf - inf.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_row_stat(float* smem, const float* src, int rows_valid) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    smem[r] = r < rows_valid ? src[r] : 0.f;
  }
}

struct RowMajor {};
struct ColMajor {};

// Offset of element (r, c) of a matrix with leading dimension ld.
template <class Layout>
__device__ __forceinline__ int elem(int r, int c, int ld) {
  if constexpr (std::is_same_v<Layout, RowMajor>) {
    return r * ld + c;
  } else {
    return c * ld + r;
  }
}

// A 16 x kN float32 accumulator owned by one warp: acc += A (16 x kK) * B (kK x kN), with A and B
// in shared memory in the given layouts, by exact FMA (no TF32), so fp32 inputs meet the 1e-4
// contract. Lane = 8 * ty + tx owns rows ty + 4 i (i < 4) and columns tx + 8 j (j < kN / 8); with
// the padded leading dimensions of the kernels (ld % 32 == 4) its shared-memory reads are free of
// bank conflicts.
template <int kN>
struct WarpTile {
  static_assert(kN % 16 == 0, "tile width must be a multiple of 16");
  float acc[4][kN / 8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        acc[i][j] = 0.f;
      }
    }
  }

  template <class LA, class LB, int kK>
  __device__ __forceinline__ void mma(const float* a, int lda, const float* b, int ldb) {
    const int lane = threadIdx.x & 31;
    const int ty = lane >> 3, tx = lane & 7;
#pragma unroll 4
    for (int k = 0; k < kK; ++k) {
      float av[4], bv[kN / 8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = a[elem<LA>(ty + 4 * i, k, lda)];
      }
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        bv[j] = b[elem<LB>(k, tx + 8 * j, ldb)];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < kN / 8; ++j) {
          acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(float* c, int ldc) const {
    const int lane = threadIdx.x & 31;
    const int ty = lane >> 3, tx = lane & 7;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        c[(ty + 4 * i) * ldc + tx + 8 * j] = acc[i][j];
      }
    }
  }
};

}  // namespace cem::cuda
