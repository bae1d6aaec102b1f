// Which compiled attention kernels exist. Each generated instantiation TU (one dtype x head-dim
// bucket, see generate_instantiations.py) registers its kernel set at load time, so the glue needs
// no hand-kept list and a build with some buckets compiled out simply finds fewer entries.
#pragma once

#include <driver_types.h>  // cudaError_t, cudaStream_t

#include <string>

#include "cuda/attention_params.h"

namespace cem::cuda {

enum class CemDType { kFloat32, kFloat16, kBFloat16 };

const char* dtype_name(CemDType dtype);

using AttnLauncher = cudaError_t (*)(const CemAttnParams&, cudaStream_t);

struct AttentionKernelSet {
  int max_head_dim = 0;  // handles head dims up to this (zero-padded inside the tiles)
  int tile_rows = 0;     // panels start at multiples of this
  int smem_bytes = 0;    // the largest dynamic shared memory any of its kernels asks for
  // Whether the kernels add head-summed panels with atomics (an order-dependent float sum): the
  // deterministic mode then asks for per-head panels and sums them itself.
  bool atomic_head_sums = false;
  AttnLauncher fwd = nullptr;        // o and lse for rows [row_begin, row_end); with p.probs, P added into it
  AttnLauncher bwd_delta = nullptr;  // Delta = dO . o (+ sum_j p_ij dp_bias_ij)
  AttnLauncher bwd = nullptr;        // dK (+= beta dS^T Q + P^T dO), dQ when p.dq_atomic, P and dS into p.probs/dprobs
  AttnLauncher bwd_dq = nullptr;     // dQ = beta dS K, written once per row (the deterministic mode)
  // Resident blocks per SM of the forward kernel (with or without score-bias tiles), for sizing
  // panels in whole waves; may be null.
  int (*fwd_blocks_per_sm)(bool bias) = nullptr;
};

// Called from static initializers of the generated TUs.
bool register_attention_kernels(CemDType dtype, const AttentionKernelSet& set);

// The kernel set with the smallest max_head_dim >= head_dim, or null when none was compiled.
const AttentionKernelSet* find_attention_kernels(CemDType dtype, int head_dim);

// "bf16:64,128 fp16:64,128 fp32:64,128": what this build compiled (for build_info and errors).
std::string describe_attention_kernels();

// The per-row update after each forward step (one TU for all dtypes).
cudaError_t launch_attention_epilogue(CemDType dtype, const CemEpilogueParams& params, cudaStream_t stream);

// One step of cem::attention_cached's core: the split-K partial kernel, then the combine
// (attention_decode.cu, one TU for all dtypes). The partial kernel's dynamic shared memory depends
// on block_rows, head_dim, dim and whether there is a diagonal.
cudaError_t launch_attention_decode(CemDType dtype, const CemDecodeParams& params, cudaStream_t stream);
int attention_decode_smem_bytes(const CemDecodeParams& params);

}  // namespace cem::cuda
