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
  int tile_rows = 0;     // query rows per tile: panels start at multiples of this
  int smem_bytes = 0;    // the largest dynamic shared memory any of its kernels asks for
  AttnLauncher fwd = nullptr;              // lse and o for rows [row_begin, row_end)
  AttnLauncher tile_probs = nullptr;       // P (head-summed or per head) of a row panel
  AttnLauncher tile_probs_grad = nullptr;  // P and dS = P (dP - Delta) of a row panel
  AttnLauncher bwd_delta = nullptr;        // Delta = dO . o (+ sum_j p_ij dp_bias_ij)
  AttnLauncher bwd_dk = nullptr;           // dK += beta dS^T Q + P^T dO over query rows of the launch
  AttnLauncher bwd_dq = nullptr;           // dQ = beta dS K
};

// Called from static initializers of the generated TUs.
bool register_attention_kernels(CemDType dtype, const AttentionKernelSet& set);

// The kernel set with the smallest max_head_dim >= head_dim, or null when none was compiled.
const AttentionKernelSet* find_attention_kernels(CemDType dtype, int head_dim);

// "bf16:64,128 fp16:64,128 fp32:64,128": what this build compiled (for build_info and errors).
std::string describe_attention_kernels();

// The per-row update after each forward step (one TU for all dtypes).
cudaError_t launch_attention_epilogue(CemDType dtype, const CemEpilogueParams& params, cudaStream_t stream);

}  // namespace cem::cuda
