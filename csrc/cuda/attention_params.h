// The only description of an attention launch that the CUDA kernels see: raw pointers, int64
// strides in elements, sizes and flags. No torch types, so .cu files never include torch headers.
#pragma once

#include <cstdint>

namespace cem::cuda {

// A (B, N, H, Dh) tensor with unit stride along Dh: q, k, o, dO (input dtype) and dq, dK (float32).
struct CemHeadTensor {
  void* ptr = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
};

// A row panel (B, [H,] rows, keys) with unit stride along keys. Row r of the panel is query row
// row_begin + r; head_stride is 0 when the panel is shared by all heads.
struct CemPanel {
  void* ptr = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
};

struct CemAttnParams {
  CemHeadTensor q, k, o, dout;  // input dtype
  CemHeadTensor dq, dk;         // float32

  // Per-row softmax statistics, (B, H, N) float32 with unit stride along N.
  float* lse = nullptr;
  float* delta = nullptr;  // sum_j p_ij dp_ij of the backward pass
  int64_t stat_batch_stride = 0, stat_head_stride = 0;

  // Optional float32 terms added to the scores s_ij and to dp_ij (a shared or per-head diagonal:
  // beta (lambda * x_i) . c_j and (lambda * dG_i) . c_j), one row panel at a time.
  CemPanel score_bias, dp_bias;
  // Float32 row panels the kernels add P (forward and backward) and dS = P (dP - Delta)
  // (backward) into, summed over heads unless probs_per_head. The caller zeroes them.
  CemPanel probs, dprobs;

  const void* alibi_slopes = nullptr;  // (H,), input dtype; bias -m_h (i - j)

  int batch = 0, seq = 0, heads = 0, head_dim = 0;
  // Query rows handled by this launch: [row_begin, row_end). row_begin is a multiple of the kernel
  // set's tile_rows; keys are causal, so a launch touches keys [0, row_end).
  int row_begin = 0, row_end = 0;
  float scale = 1.f;
  bool probs_per_head = false;
  // Backward: dQ is added into dq (zeroed by the caller) by the main backward kernel; otherwise the
  // deterministic bwd_dq kernel writes it.
  bool dq_atomic = false;
  // Backward: key rows from here on get their first contribution in this launch and are written,
  // the ones before it accumulated (dK sums over panels and steps).
  int dk_overwrite_from = 0;
  // 16-byte vector loads are legal for q, k, o, dout (aligned base pointers and row/head strides).
  bool vec_loads = false;
};

// The fused update after each forward step, one row (b, i) per block:
//   G = g + lambda * vbar,  PG = p * G + U (U^T G),  Delta += eta_t PG,
//   x^{t+1} = round(x^0 + Delta),  out = round(Delta),  diag_out = round(lambda * vbar).
struct CemEpilogueParams {
  const float* g = nullptr;       // (rows, D): W_Q^T o, float32
  const float* vbar = nullptr;    // (rows, D): the diagonal's value term (Pbar c, or sum_k lambda_k P^k c), or null
  const float* lam = nullptr;     // (D,) float32: scales vbar (a shared diagonal), or null
  void* diag_out = nullptr;       // (rows, D), input dtype: lambda * vbar saved for the backward, or null
  const float* z = nullptr;       // (rows, R): U^T G, or null without a low-rank part
  const float* u_t = nullptr;     // (R, D): U transposed, float32
  const void* p_diag = nullptr;   // (D,), input dtype, or null (p = 1)
  const void* step_size = nullptr;  // (T,), input dtype
  int step = 0;
  float* delta = nullptr;         // (rows, D), float32, updated in place
  const void* x0 = nullptr;       // (rows, D), input dtype
  void* x_next = nullptr;         // (rows, D), input dtype, or null on the last step
  void* out = nullptr;            // (rows, D), input dtype, or null before the last step
  int64_t rows = 0, dim = 0, rank = 0;
};

}  // namespace cem::cuda

// One step of cem::attention_cached's attention core (attention_decode.cu): the chunk's rows
// against their context, split over key partitions (flash-decoding). Row r of batch row b sits at
// position n_b + r and attends keys [0, n_b + r]: cached ones below n_b, the chunk's from there.
// Tensors are contiguous but for the cache's batch stride; T is the input dtype.
struct CemDecodeParams {
  const void* q = nullptr;              // (B, C, H, Dh) T: W_Q x^t
  const void* x = nullptr;              // (B, C, D) T: x^t, for the diagonal's score term
  const void* chunk_keys = nullptr;     // (B, C, H, Dh) T
  const void* chunk_context = nullptr;  // (B, C, D) T: x^0 of the chunk, with a diagonal
  const void* cache_keys = nullptr;     // (B, capacity, H, Dh) T, rows keys_batch_stride apart
  const void* cache_context = nullptr;  // (B, capacity, D) T, with a diagonal, rows context_batch_stride apart
  int64_t keys_batch_stride = 0, context_batch_stride = 0;
  const int64_t* lengths = nullptr;     // (B,) n_b, on the device
  const float* lam = nullptr;           // (D,) or (H, D) float32, or null without a diagonal
  bool per_head = false;
  const void* alibi_slopes = nullptr;   // (H,) T, or null
  float scale = 1.f;
  int batch = 0, chunk = 0, capacity = 0, heads = 0, head_dim = 0, dim = 0;
  int block_rows = 1;       // chunk rows per block (the smem layout depends on it)
  int partitions = 1;       // key partitions per (b, h); partition p covers [p * partition_keys, ...)
  int partition_keys = 0;   // a multiple of the key tile
  // Per (b, r, h, partition), float32: running max and sum of exp, and the unnormalized P K (Dh)
  // and, with a diagonal, P C (D). Partitions past a row's keys leave max = -inf and sum = 0.
  float* part_max = nullptr;
  float* part_sum = nullptr;
  float* part_o = nullptr;
  float* part_vbar = nullptr;
  // Outputs of the combine step: o (B, C, H, Dh) in T, and with a diagonal vbar (B, C, D) float32:
  // sum_h Pbar c for a shared diagonal (the epilogue applies lambda), sum_h lambda_h P^h c per head.
  // Rows whose n_b is out of range (n_b < 0 or n_b + C > capacity) are NaN.
  void* o = nullptr;
  float* vbar = nullptr;
};
