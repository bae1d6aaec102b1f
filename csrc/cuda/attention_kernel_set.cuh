// The launchers of one (dtype, head-dim bucket) specialization and the kernel set it registers.
// Included only by the generated instantiation units (attention_<dtype>_hdim<N>.cu).
//
// bf16/fp16 run the tensor-core kernels (mma.sync, ldmatrix, cp.async: attention_*_tc.cuh);
// float32 runs the exact-FMA kernels of attention_kernels_fp32.cuh behind the same interface.
// The sm_90a seam: a wgmma/TMA specialization would add its own set here, chosen by the
// device's architecture at registration, leaving the glue untouched.
#pragma once

#include <type_traits>

#include "cuda/attention_bwd_tc.cuh"
#include "cuda/attention_fwd_tc.cuh"
#include "cuda/attention_kernels_fp32.cuh"
#include "cuda/attention_rows_tc.cuh"
#include "cuda/kernel_registry.h"

namespace cem::cuda {

inline int query_tiles(const CemAttnParams& p, int rows) { return ceil_div(p.row_end - p.row_begin, rows); }
inline int key_tiles(const CemAttnParams& p, int keys) { return ceil_div(p.row_end, keys); }

template <typename T, int kHeadDim>
struct TensorCoreLaunchers {
  using Fwd = RowTraits<T, kHeadDim, 128>;
  using Delta = RowTraits<T, kHeadDim, 64>;
  using Dq = RowTraits<T, kHeadDim, 64, true>;
  using Bwd = KeyTraits<T, kHeadDim>;
  static constexpr int kFwdSmemMax = Fwd::smem_bytes(true, false);
  static constexpr int kSmemMax =
      cmax(cmax(kFwdSmemMax, Delta::kSmemMax), cmax(Dq::kSmemMax, Bwd::kSmemMax));
  static_assert(kSmemMax <= 163 * 1024, "tile layout exceeds the sm_80 shared-memory limit");

  static dim3 row_grid(const CemAttnParams& p, int rows) { return dim3(query_tiles(p, rows), p.heads, p.batch); }

  static cudaError_t fwd(const CemAttnParams& p, cudaStream_t s) {
    const int smem = Fwd::smem_bytes(p.score_bias.ptr != nullptr, false);
    return launch_kernel("attention_fwd_tc_kernel", attention_fwd_tc_kernel<Fwd>, row_grid(p, Fwd::kBlockM),
                         dim3(Fwd::kThreads), kFwdSmemMax, smem, s, p);
  }
  static cudaError_t bwd_delta(const CemAttnParams& p, cudaStream_t s) {
    const bool diag = p.dp_bias.ptr != nullptr;  // without one the kernel reads no keys
    return launch_kernel("attention_delta_tc_kernel", attention_delta_tc_kernel<Delta>, row_grid(p, Delta::kBlockM),
                         dim3(Delta::kThreads), Delta::kSmemMax, diag ? Delta::smem_bytes(true, true) : 0, s, p);
  }
  static cudaError_t bwd(const CemAttnParams& p, cudaStream_t s) {
    const dim3 grid(key_tiles(p, Bwd::kBlockN), p.heads, p.batch);
    return launch_kernel("attention_bwd_tc_kernel", attention_bwd_tc_kernel<Bwd>, grid, dim3(Bwd::kThreads),
                         Bwd::kSmemMax, Bwd::smem_bytes(p.score_bias.ptr != nullptr), s, p);
  }
  static cudaError_t bwd_dq(const CemAttnParams& p, cudaStream_t s) {
    const bool diag = p.dp_bias.ptr != nullptr;
    return launch_kernel("attention_dq_tc_kernel", attention_dq_tc_kernel<Dq>, row_grid(p, Dq::kBlockM),
                         dim3(Dq::kThreads), Dq::kSmemMax, Dq::smem_bytes(diag, diag), s, p);
  }

  static int fwd_blocks_per_sm(bool bias) {
    return resident_blocks(attention_fwd_tc_kernel<Fwd>, Fwd::kThreads, kFwdSmemMax, Fwd::smem_bytes(bias, false));
  }

  static AttentionKernelSet make() {
    AttentionKernelSet set;
    set.max_head_dim = kHeadDim;
    set.tile_rows = Fwd::kBlockM;
    set.fwd_blocks_per_sm = &fwd_blocks_per_sm;
    set.smem_bytes = kSmemMax;
    set.atomic_head_sums = true;
    set.fwd = &fwd;
    set.bwd_delta = &bwd_delta;
    set.bwd = &bwd;
    set.bwd_dq = &bwd_dq;
    return set;
  }
};

// float32: the forward adds P to a panel with a separate tile kernel (which loops over heads, so
// head sums need no atomics), and the backward writes dQ itself, deterministically.
template <int kHeadDim>
struct Fp32Launchers {
  using Tr = Fp32Traits<kHeadDim>;

  static int tiles_in_launch(const CemAttnParams& p) { return query_tiles(p, Tr::kBlock); }
  static dim3 row_grid(const CemAttnParams& p) { return dim3(tiles_in_launch(p), p.heads, p.batch); }
  static dim3 panel_grid(const CemAttnParams& p) { return dim3(key_tiles(p, Tr::kBlock), tiles_in_launch(p), p.batch); }

  static cudaError_t fwd(const CemAttnParams& p, cudaStream_t s) {
    cudaError_t err = launch_kernel("attention_fwd_kernel", attention_fwd_kernel<Tr>, row_grid(p), dim3(Tr::kThreads),
                                    Tr::kSmemFwd, Tr::kSmemFwd, s, p);
    if (err != cudaSuccess || p.probs.ptr == nullptr) return err;
    return launch_kernel("attention_tile_probs_kernel", attention_tile_probs_kernel<Tr, false>, panel_grid(p),
                         dim3(Tr::kThreads), Tr::kSmemProbs, Tr::kSmemProbs, s, p);
  }
  static cudaError_t bwd_delta(const CemAttnParams& p, cudaStream_t s) {
    const int smem = p.dp_bias.ptr != nullptr ? Tr::kSmemDelta : 0;  // without a diagonal: no tiles
    return launch_kernel("attention_bwd_delta_kernel", attention_bwd_delta_kernel<Tr>, row_grid(p), dim3(Tr::kThreads),
                         Tr::kSmemDelta, smem, s, p);
  }
  static cudaError_t bwd(const CemAttnParams& p, cudaStream_t s) {
    cudaError_t err = cudaSuccess;
    if (p.probs.ptr != nullptr) {
      err = launch_kernel("attention_tile_probs_grad_kernel", attention_tile_probs_kernel<Tr, true>, panel_grid(p),
                          dim3(Tr::kThreads), Tr::kSmemProbs, Tr::kSmemProbs, s, p);
      if (err != cudaSuccess) return err;
    }
    const dim3 key_grid(key_tiles(p, Tr::kBlock), p.heads, p.batch);  // every key tile up to row_end
    err = launch_kernel("attention_bwd_dk_kernel", attention_bwd_dk_kernel<Tr>, key_grid, dim3(Tr::kThreads),
                        Tr::kSmemDk, Tr::kSmemDk, s, p);
    if (err != cudaSuccess) return err;
    return launch_kernel("attention_bwd_dq_kernel", attention_bwd_dq_kernel<Tr>, row_grid(p), dim3(Tr::kThreads),
                         Tr::kSmemDq, Tr::kSmemDq, s, p);
  }

  static int fwd_blocks_per_sm(bool) {
    return resident_blocks(attention_fwd_kernel<Tr>, Tr::kThreads, Tr::kSmemFwd, Tr::kSmemFwd);
  }

  static AttentionKernelSet make() {
    AttentionKernelSet set;
    set.max_head_dim = kHeadDim;
    set.tile_rows = Tr::kBlock;
    set.fwd_blocks_per_sm = &fwd_blocks_per_sm;
    set.smem_bytes = Tr::kSmemMax;
    set.fwd = &fwd;
    set.bwd_delta = &bwd_delta;
    set.bwd = &bwd;
    return set;  // no bwd_dq: bwd writes dQ
  }
};

template <typename T, int kHeadDim>
AttentionKernelSet make_attention_kernel_set() {
  if constexpr (std::is_same_v<T, float>) {
    return Fp32Launchers<kHeadDim>::make();
  } else {
    return TensorCoreLaunchers<T, kHeadDim>::make();
  }
}

}  // namespace cem::cuda

// One line per generated TU: compiles the kernels of (T, head-dim bucket) and registers them.
#define CEM_INSTANTIATE_ATTENTION(T, HEAD_DIM, DTYPE)                                              \
  namespace {                                                                                      \
  const bool cem_attention_kernels_registered =                                                    \
      ::cem::cuda::register_attention_kernels(DTYPE, ::cem::cuda::make_attention_kernel_set<T, HEAD_DIM>()); \
  }
