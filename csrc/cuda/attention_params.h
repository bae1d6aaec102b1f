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
