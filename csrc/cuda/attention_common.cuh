// What every attention kernel reads of CemAttnParams, and shared-memory bookkeeping: the (batch,
// head) slices of the head tensors, the ALiBi slope, the float32 row panels of the diagonal.
#pragma once

#include <cstdint>

#include "cuda/attention_params.h"
#include "cuda/device_runtime.cuh"
#include "cuda/tile_ops.cuh"

namespace cem::cuda {

template <typename U>
__device__ __forceinline__ U* smem_at(int offset) {
  return reinterpret_cast<U*>(dynamic_smem() + offset);
}

constexpr int round_up_128(int bytes) { return (bytes + 127) / 128 * 128; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ const T* head_ptr(const CemHeadTensor& t, int b, int h) {
  return static_cast<const T*>(t.ptr) + b * t.batch_stride + h * t.head_stride;
}

template <typename T>
__device__ __forceinline__ T* head_ptr_mut(const CemHeadTensor& t, int b, int h) {
  return static_cast<T*>(t.ptr) + b * t.batch_stride + h * t.head_stride;
}

// The (batch, head) row of a per-row statistic (p.lse or p.delta); F is float or const float.
template <typename F>
__device__ __forceinline__ F* stat_ptr(F* stats, const CemAttnParams& p, int b, int h) {
  return stats + b * p.stat_batch_stride + h * p.stat_head_stride;
}

// This thread's share of dO_i . o_i (Delta's first term) for row i of (b, h): elements first,
// first + stride, ... of the head dim; 0 for a row past the launch. The row's threads sum them.
template <typename T>
__device__ __forceinline__ float partial_dout_dot_o(const CemAttnParams& p, int b, int h, int i, int first, int stride) {
  if (i >= p.row_end) {
    return 0.f;
  }
  const T* o = head_ptr<T>(p.o, b, h) + i * p.o.row_stride;
  const T* dout = head_ptr<T>(p.dout, b, h) + i * p.dout.row_stride;
  float v = 0.f;
  for (int d = first; d < p.head_dim; d += stride) {
    v += to_float(dout[d]) * to_float(o[d]);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ float alibi_slope(const CemAttnParams& p, int h) {
  return p.alibi_slopes != nullptr ? to_float(static_cast<const T*>(p.alibi_slopes)[h]) : 0.f;
}

// The (batch, head) slice of a float32 row panel, or null without one. Row r is query row
// row_begin + r.
__device__ __forceinline__ float* panel_ptr(const CemPanel& panel, int b, int h) {
  return panel.ptr != nullptr ? static_cast<float*>(panel.ptr) + b * panel.batch_stride + h * panel.head_stride
                              : nullptr;
}

}  // namespace cem::cuda
