// CUDA implementation of cem::attention_cached (docs/decoding.md): per step, q = W_Q x^t through
// cuBLAS, the split-K attention core over the cache (attention_decode.cu), G = W_Q^T o through
// cuBLAS and the training forward's epilogue (step_epilogue.h) for the preconditioner and the step. Every
// launch goes on the current stream and nothing reads device memory on the host, so the T steps
// queue without a host sync (cache lengths given on the CPU are copied to the device once).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cuda/attention_setup.h"
#include "cuda/step_epilogue.h"
#include "ops/autocast_off.h"
#include "ops/cached_layout.h"

namespace cem::cuda {
namespace {

using CachedResult = std::tuple<at::Tensor, at::Tensor>;

constexpr int kMaxBlockRows = 8;   // chunk rows per decode block: decoding is 1, prefill tiles of 8
constexpr int kKeyTile = 32;       // attention_decode.cu's key tile: partitions are multiples of it
constexpr int kMaxWeights = 8192;  // H x partitions, the combine kernel's shared memory

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per block, as many as fit the device's shared memory (the diagonal's rows are D wide).
int choose_block_rows(const char* op, CemDecodeParams p) {
  const int limit = max_dynamic_smem_optin();
  for (int rows = std::min(kMaxBlockRows, p.chunk); rows >= 1; --rows) {
    p.block_rows = rows;
    if (attention_decode_smem_bytes(p) <= limit) return rows;
  }
  TORCH_CHECK_VALUE(false, op, ": D = ", p.dim, " and Dh = ", p.head_dim, " need ", attention_decode_smem_bytes(p),
                    " bytes of shared memory per decode block, more than this device's ", limit);
  return 0;
}

// Key partitions: enough (batch, head, partition) blocks to fill the device about four times
// over, each partition a whole number of key tiles, over the longest context of the call.
void choose_partitions(CemDecodeParams& p, int64_t longest_context) {
  const int64_t row_blocks = ceil_div64(p.chunk, p.block_rows);
  const int64_t blocks = p.batch * p.heads * row_blocks;
  const int64_t tiles = std::max<int64_t>(1, ceil_div64(longest_context, kKeyTile));
  int64_t partitions = std::clamp<int64_t>(ceil_div64(4 * multiprocessor_count(), blocks), 1, tiles);
  partitions = std::min<int64_t>(partitions, std::max<int64_t>(1, kMaxWeights / p.heads));
  const int64_t keys = ceil_div64(tiles, partitions) * kKeyTile;
  p.partition_keys = static_cast<int>(keys);
  p.partitions = static_cast<int>(ceil_div64(longest_context, keys));
}

CachedResult attention_cached_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
                                   const at::Tensor& cache_keys, const OptTensor& cache_context,
                                   const at::Tensor& cache_lengths, const OptTensor& diag, const OptTensor& alibi_slopes,
                                   const OptTensor& precond_diag, const OptTensor& precond_lowrank,
                                   const at::Tensor& step_size, std::optional<double> scale) {
  const AutocastOff autocast_off;
  constexpr const char* kOp = "cem::attention_cached";
  const auto s = check_attention_cached_args(kOp, x, w_q, w_k, cache_keys, cache_context, cache_lengths, diag,
                                             alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  const auto dtype = kernel_dtype(x.scalar_type());
  if (!dtype) {  // float64: the reference
    auto out = call_reference(kOp, x, w_q, w_k, cache_keys, cache_context, cache_lengths, diag, alibi_slopes,
                              precond_diag, precond_lowrank, step_size, scale);
    return {out[0].toTensor(), out[1].toTensor()};
  }
  TORCH_CHECK_VALUE(s.capacity <= INT_MAX / 2 && s.batch * s.seq <= INT_MAX / 8 && s.batch <= 65535 && s.heads <= 65535,
                    kOp, ": the cache capacity (", s.capacity, "), B * C = ", s.batch * s.seq, ", B = ", s.batch,
                    " or H = ", s.heads, " exceeds the CUDA kernels' limits");
  const DeviceGuard guard(x.device());
  const cudaStream_t stream = current_stream();
  const int64_t rows = s.batch * s.seq, hd = s.heads * s.head_dim;
  const auto x0 = x.contiguous();
  const auto wq = w_q.contiguous().view({hd, s.dim});
  const auto keys = at::matmul(x0, w_k.contiguous().view({hd, s.dim}).t()).view({s.batch, s.seq, s.heads, s.head_dim});
  if (rows == 0) {
    return {at::zeros_like(x0), keys};
  }
  const auto cache_k = rows_contiguous(cache_keys);
  const auto cache_c = cache_context.has_value() ? rows_contiguous(*cache_context) : at::Tensor();
  // Lengths on the CPU were checked and say how far the longest row reaches; copying them is the
  // one host-to-device transfer of the call. Device lengths cost nothing: partitions then span the
  // capacity (a module passes its cache narrowed to the positions in use).
  const int64_t longest = cache_lengths.device().is_cpu() ? cache_lengths.max().item<int64_t>() + s.seq : s.capacity;
  const auto lengths = cache_lengths.to(x.device(), at::kLong, /*non_blocking=*/true).contiguous();
  const auto lam = diag.has_value() ? diag->to(at::kFloat).contiguous() : at::Tensor();
  const auto slopes = alibi_slopes.has_value() ? alibi_slopes->contiguous() : at::Tensor();
  const bool has_diag = diag.has_value();

  CemDecodeParams p;
  p.x = nullptr;
  p.chunk_keys = keys.data_ptr();
  p.chunk_context = has_diag ? x0.data_ptr() : nullptr;
  p.cache_keys = cache_k.data_ptr();
  p.cache_context = has_diag ? cache_c.data_ptr() : nullptr;
  p.keys_batch_stride = cache_k.stride(0);
  p.context_batch_stride = has_diag ? cache_c.stride(0) : 0;
  p.lengths = lengths.data_ptr<int64_t>();
  p.lam = has_diag ? lam.data_ptr<float>() : nullptr;
  p.per_head = s.diag_mode == DiagMode::kPerHead;
  p.alibi_slopes = slopes.defined() ? slopes.data_ptr() : nullptr;
  p.scale = static_cast<float>(resolve_scale(scale, s.head_dim));
  p.batch = static_cast<int>(s.batch), p.chunk = static_cast<int>(s.seq), p.capacity = static_cast<int>(s.capacity);
  p.heads = static_cast<int>(s.heads), p.head_dim = static_cast<int>(s.head_dim), p.dim = static_cast<int>(s.dim);
  p.block_rows = choose_block_rows(kOp, p);
  choose_partitions(p, longest);

  const auto f32 = x0.options().dtype(at::kFloat);
  const int64_t slots = rows * s.heads * p.partitions;
  const auto part_max = at::empty({slots}, f32), part_sum = at::empty({slots}, f32);
  const auto part_o = at::empty({slots, s.head_dim}, f32);
  const auto part_vbar = has_diag ? at::empty({slots, s.dim}, f32) : at::Tensor();
  const auto o = at::empty({s.batch, s.seq, s.heads, s.head_dim}, x0.options());
  auto vbar = has_diag ? at::empty({rows, s.dim}, f32) : at::Tensor();
  p.part_max = part_max.data_ptr<float>();
  p.part_sum = part_sum.data_ptr<float>();
  p.part_o = part_o.data_ptr<float>();
  p.part_vbar = has_diag ? part_vbar.data_ptr<float>() : nullptr;
  p.o = o.data_ptr();
  p.vbar = has_diag ? vbar.data_ptr<float>() : nullptr;

  const StepEpilogue epilogue(precond_diag, precond_lowrank, step_size, lam, p.per_head);
  auto delta = at::zeros({s.batch, s.seq, s.dim}, f32);
  auto out = at::empty_like(x0);
  at::Tensor x_t = x0;
  for (int64_t t = 0; t < s.steps; ++t) {
    const auto q = at::matmul(x_t, wq.t());  // (B, C, H Dh)
    p.q = q.data_ptr();
    p.x = x_t.data_ptr();
    check_launch(stream, launch_attention_decode(*dtype, p, stream), "attention_decode");
    const auto g = mm_f32(o.view({rows, hd}), wq);
    const auto x_next = t + 1 < s.steps ? at::empty_like(x0) : at::Tensor();
    epilogue.apply(*dtype, stream, t, s.steps, g, vbar, nullptr, delta, x0,
                   x_next.defined() ? x_next.data_ptr() : nullptr, out.data_ptr());
    if (x_next.defined()) x_t = x_next;
  }
  return {out, keys};
}

}  // namespace

CEM_CUDA_LIBRARY_IMPL(m) { m.impl("attention_cached", &attention_cached_cuda); }

}  // namespace cem::cuda
