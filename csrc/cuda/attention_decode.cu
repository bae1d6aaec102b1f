// cem::attention_cached's attention core, one step (docs/decoding.md): split-K over the cached
// keys as in flash-decoding. Each block takes one (batch row, head, key partition) and a few chunk
// rows, streams its partition's keys through shared memory once, and keeps an online softmax per
// row; a combine kernel merges the partitions by their maxima and sums. Lengths are read on the
// device, so a decode step needs no host sync; a row with an out-of-range length reads nothing
// and comes out NaN.
#include <cmath>

#include "cuda/attention_common.cuh"
#include "cuda/attention_params.h"
#include "cuda/device_runtime.cuh"
#include "cuda/kernel_registry.h"
#include "cuda/tile_ops.cuh"

namespace cem::cuda {
namespace {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kKeyTile = 32;  // keys per shared-memory tile, one per lane in the softmax update
static_assert(kKeyTile == 32 && kDecodeThreads % 32 == 0, "score (r, jj) is written and read by one thread");

// The shared-memory carve of the partial kernel, in floats, for block_rows rows.
struct DecodeSmem {
  int q, scaled_x, o, vbar, probs, max, sum, alpha, keys, total;
  __host__ __device__ explicit DecodeSmem(const CemDecodeParams& p) {
    const int rows = p.block_rows, diag = p.lam != nullptr ? 1 : 0, key_stride = p.head_dim + 1;
    q = 0;
    scaled_x = q + rows * p.head_dim;
    o = scaled_x + diag * rows * p.dim;
    vbar = o + rows * p.head_dim;
    probs = vbar + diag * rows * p.dim;
    max = probs + rows * kKeyTile;
    sum = max + rows;
    alpha = sum + rows;
    keys = alpha + rows;
    total = keys + kKeyTile * key_stride;
  }
};

__device__ __forceinline__ bool length_in_range(const CemDecodeParams& p, int64_t n) {
  return n >= 0 && n + p.chunk <= p.capacity;
}

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_partial_kernel(const CemDecodeParams p) {
  // x: partitions within row blocks (x has room for long prefill chunks), y: head, z: batch row.
  const int partition = blockIdx.x % p.partitions, r0 = (blockIdx.x / p.partitions) * p.block_rows;
  const int h = blockIdx.y, b = blockIdx.z;
  const int rows = min(p.block_rows, p.chunk - r0);
  const int64_t cached = p.lengths[b];
  if (!length_in_range(p, cached)) {
    return;  // the combine kernel writes NaN for this batch row
  }
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int key_begin = partition * p.partition_keys;
  const int64_t last_key = cached + r0 + rows;  // one past the block's last row position
  const int key_end = static_cast<int>(key_begin + p.partition_keys < last_key ? key_begin + p.partition_keys : last_key);
  const bool diag = p.lam != nullptr;
  const int key_stride = p.head_dim + 1;  // odd: lanes reading one column of the tile hit distinct banks

  const DecodeSmem layout(p);
  float* smem = smem_at<float>(0);
  float* q_s = smem + layout.q;
  float* xl_s = smem + layout.scaled_x;
  float* o_s = smem + layout.o;
  float* v_s = smem + layout.vbar;
  float* probs_s = smem + layout.probs;
  float* max_s = smem + layout.max;
  float* sum_s = smem + layout.sum;
  float* alpha_s = smem + layout.alpha;
  float* keys_s = smem + layout.keys;

  const T* q = static_cast<const T*>(p.q);
  const T* x = static_cast<const T*>(p.x);
  const T* cache_keys = static_cast<const T*>(p.cache_keys);
  const T* chunk_keys = static_cast<const T*>(p.chunk_keys);
  const T* cache_context = static_cast<const T*>(p.cache_context);
  const T* chunk_context = static_cast<const T*>(p.chunk_context);
  const float* lam = p.lam != nullptr ? p.lam + (p.per_head ? h * p.dim : 0) : nullptr;
  const float slope = p.alibi_slopes != nullptr ? to_float(static_cast<const T*>(p.alibi_slopes)[h]) : 0.f;
  auto key_row = [&](int64_t j) {
    return j < cached ? cache_keys + b * p.keys_batch_stride + (j * p.heads + h) * p.head_dim
                      : chunk_keys + ((b * int64_t{p.chunk} + (j - cached)) * p.heads + h) * p.head_dim;
  };
  auto context_row = [&](int64_t j) {
    return j < cached ? cache_context + b * p.context_batch_stride + j * p.dim
                      : chunk_context + (b * int64_t{p.chunk} + (j - cached)) * p.dim;
  };

  for (int i = tid; i < rows * p.head_dim; i += kDecodeThreads) {
    const int r = i / p.head_dim, d = i % p.head_dim;
    q_s[i] = to_float(q[((b * int64_t{p.chunk} + r0 + r) * p.heads + h) * p.head_dim + d]);
    o_s[i] = 0.f;
  }
  if (diag) {
    for (int i = tid; i < rows * p.dim; i += kDecodeThreads) {
      const int r = i / p.dim, e = i % p.dim;
      xl_s[i] = lam[e] * to_float(x[(b * int64_t{p.chunk} + r0 + r) * p.dim + e]);
      v_s[i] = 0.f;
    }
  }
  for (int r = tid; r < rows; r += kDecodeThreads) {
    max_s[r] = -INFINITY;
    sum_s[r] = 0.f;
  }
  // No barrier yet: the first key tile's barrier orders these writes before any other thread's
  // read, and without keys every thread writes out only what it set itself.

  for (int k0 = key_begin; k0 < key_end; k0 += kKeyTile) {
    const int keys = min(kKeyTile, key_end - k0);
    for (int i = tid; i < keys * p.head_dim; i += kDecodeThreads) {
      const int jj = i / p.head_dim, d = i % p.head_dim;
      keys_s[jj * key_stride + d] = to_float(key_row(k0 + jj)[d]);
    }
    __syncthreads();
    for (int i = tid; i < rows * kKeyTile; i += kDecodeThreads) {
      const int r = i / kKeyTile, jj = i % kKeyTile;
      const int64_t j = k0 + jj, position = cached + r0 + r;
      float s = -INFINITY;
      if (jj < keys && j <= position) {
        float dot = 0.f;
        for (int d = 0; d < p.head_dim; ++d) dot = fmaf(q_s[r * p.head_dim + d], keys_s[jj * key_stride + d], dot);
        if (diag) {
          const T* c = context_row(j);
          for (int e = 0; e < p.dim; ++e) dot = fmaf(xl_s[r * p.dim + e], to_float(c[e]), dot);
        }
        s = p.scale * dot - slope * static_cast<float>(position - j);
      }
      probs_s[i] = s;
    }
    // Online softmax, one warp per row: lane jj owns key k0 + jj of the tile. The thread that
    // wrote score (r, jj) above is the one that reads it here (warp r mod 4, lane jj), so no
    // barrier is needed in between.
    for (int r = warp; r < rows; r += kDecodeWarps) {
      const float s = probs_s[r * kKeyTile + lane];
      const float previous = max_s[r];
      const float tile_max = warp_max(s);
      const float next = fmaxf(previous, tile_max);
      // A row whose keys are all still masked keeps max -inf: scale 1, probabilities 0.
      const float alpha = next == -INFINITY ? 1.f : __expf(previous - next);
      const float prob = next == -INFINITY ? 0.f : __expf(s - next);
      const float tile_sum = warp_sum(prob);
      probs_s[r * kKeyTile + lane] = prob;
      __syncwarp();  // every lane has read max_s[r] and sum_s[r] before lane 0 rewrites them
      if (lane == 0) {
        max_s[r] = next;
        sum_s[r] = sum_s[r] * alpha + tile_sum;
        alpha_s[r] = alpha;
      }
    }
    __syncthreads();
    for (int i = tid; i < rows * p.head_dim; i += kDecodeThreads) {
      const int r = i / p.head_dim, d = i % p.head_dim;
      float acc = o_s[i] * alpha_s[r];
      for (int jj = 0; jj < keys; ++jj) acc = fmaf(probs_s[r * kKeyTile + jj], keys_s[jj * key_stride + d], acc);
      o_s[i] = acc;
    }
    if (diag) {
      for (int i = tid; i < rows * p.dim; i += kDecodeThreads) {
        const int r = i / p.dim, e = i % p.dim;
        float acc = v_s[i] * alpha_s[r];
        for (int jj = 0; jj < keys; ++jj) {
          const float prob = probs_s[r * kKeyTile + jj];
          if (prob != 0.f) acc = fmaf(prob, to_float(context_row(k0 + jj)[e]), acc);
        }
        v_s[i] = acc;
      }
    }
    __syncthreads();
  }

  // Partition slot (b, r, h, partition) of the (B, C, H, P) statistics.
  auto slot = [&](int r) { return ((b * int64_t{p.chunk} + r0 + r) * p.heads + h) * p.partitions + partition; };
  for (int r = tid; r < rows; r += kDecodeThreads) {
    p.part_max[slot(r)] = max_s[r];
    p.part_sum[slot(r)] = sum_s[r];
  }
  for (int i = tid; i < rows * p.head_dim; i += kDecodeThreads) {
    const int r = i / p.head_dim, d = i % p.head_dim;
    p.part_o[slot(r) * p.head_dim + d] = o_s[i];
  }
  if (diag) {
    for (int i = tid; i < rows * p.dim; i += kDecodeThreads) {
      const int r = i / p.dim, e = i % p.dim;
      p.part_vbar[slot(r) * p.dim + e] = v_s[i];
    }
  }
}

// One (b, r) row per block: each head's partitions weighted by exp(max_p - max) / sum, then o per
// head and the diagonal's vbar summed over heads. Shared memory: the H x P weights.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_combine_kernel(const CemDecodeParams p) {
  const int64_t row = blockIdx.x;  // b * C + r
  const int b = static_cast<int>(row / p.chunk);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int hp = p.heads * p.partitions;
  T* o = static_cast<T*>(p.o) + row * p.heads * p.head_dim;
  float* vbar = p.vbar != nullptr ? p.vbar + row * p.dim : nullptr;
  if (!length_in_range(p, p.lengths[b])) {
    for (int i = tid; i < p.heads * p.head_dim; i += kDecodeThreads) o[i] = from_float<T>(NAN);
    if (vbar != nullptr) {
      for (int e = tid; e < p.dim; e += kDecodeThreads) vbar[e] = NAN;
    }
    return;
  }
  float* weights = smem_at<float>(0);  // (H, P)
  const float* part_max = p.part_max + row * hp;
  const float* part_sum = p.part_sum + row * hp;
  for (int h = warp; h < p.heads; h += kDecodeWarps) {
    float m = -INFINITY;
    for (int i = lane; i < p.partitions; i += 32) m = fmaxf(m, part_max[h * p.partitions + i]);
    m = warp_max(m);
    float total = 0.f;
    for (int i = lane; i < p.partitions; i += 32) {
      const float mi = part_max[h * p.partitions + i];
      total += mi == -INFINITY ? 0.f : __expf(mi - m) * part_sum[h * p.partitions + i];
    }
    total = warp_sum(total);  // > 0: every row attends at least to itself
    for (int i = lane; i < p.partitions; i += 32) {
      const float mi = part_max[h * p.partitions + i];
      weights[h * p.partitions + i] = mi == -INFINITY ? 0.f : __expf(mi - m) / total;
    }
  }
  __syncthreads();
  const float* part_o = p.part_o + row * hp * p.head_dim;
  for (int i = tid; i < p.heads * p.head_dim; i += kDecodeThreads) {
    const int h = i / p.head_dim, d = i % p.head_dim;
    float acc = 0.f;
    for (int k = 0; k < p.partitions; ++k) {
      acc = fmaf(weights[h * p.partitions + k], part_o[(h * p.partitions + k) * p.head_dim + d], acc);
    }
    o[i] = from_float<T>(acc);
  }
  if (vbar != nullptr) {
    const float* part_vbar = p.part_vbar + row * hp * p.dim;
    for (int e = tid; e < p.dim; e += kDecodeThreads) {
      float acc = 0.f;
      for (int h = 0; h < p.heads; ++h) {
        float head = 0.f;
        for (int k = 0; k < p.partitions; ++k) {
          head = fmaf(weights[h * p.partitions + k], part_vbar[(h * p.partitions + k) * p.dim + e], head);
        }
        acc = p.per_head ? fmaf(p.lam[h * p.dim + e], head, acc) : acc + head;
      }
      vbar[e] = acc;
    }
  }
}

template <typename T>
cudaError_t launch(const CemDecodeParams& p, cudaStream_t stream) {
  const int row_blocks = (p.chunk + p.block_rows - 1) / p.block_rows;
  const int partial_smem = DecodeSmem(p).total * static_cast<int>(sizeof(float));
  cudaError_t err = launch_kernel(
      "attention_decode_partial_kernel", attention_decode_partial_kernel<T>,
      dim3(static_cast<unsigned>(p.partitions * row_blocks), static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch)),
      dim3(kDecodeThreads), partial_smem, partial_smem, stream, p);
  if (err != cudaSuccess) {
    return err;
  }
  const int combine_smem = p.heads * p.partitions * static_cast<int>(sizeof(float));
  return launch_kernel("attention_decode_combine_kernel", attention_decode_combine_kernel<T>,
                       dim3(static_cast<unsigned>(p.batch * p.chunk)), dim3(kDecodeThreads), combine_smem, combine_smem,
                       stream, p);
}

}  // namespace

int attention_decode_smem_bytes(const CemDecodeParams& params) {
  return DecodeSmem(params).total * static_cast<int>(sizeof(float));
}

cudaError_t launch_attention_decode(CemDType dtype, const CemDecodeParams& params, cudaStream_t stream) {
  switch (dtype) {
    case CemDType::kFloat32: return launch<float>(params, stream);
    case CemDType::kFloat16: return launch<__half>(params, stream);
    case CemDType::kBFloat16: return launch<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cem::cuda
