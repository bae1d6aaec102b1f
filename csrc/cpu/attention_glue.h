// Glue shared by the CPU attention forward and backward: tensors in the accumulation dtype,
// the core's call-wide inputs, and the parallel loop over (batch, query block) work items.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdlib>

#include "cpu/attention_core.h"
#include "cpu/tensor_utils.h"
#include "ops/checks.h"

namespace cem::cpu {

// Call-wide tensors the core reads, contiguous in the accumulation dtype.
struct AttnCallTensors {
  at::Tensor context;  // (B, N, D), c = x^0
  at::Tensor w_q;      // (H * Dh, D)
  at::Tensor w_k;      // (H * Dh, D)
  at::Tensor keys;     // (B, N, H * Dh) = c W_K^T, once per call: the context never moves
  at::Tensor key_tiles;      // (B, H, NB, Dh, kKeyBlock)
  at::Tensor context_tiles;  // (B, NB, D, kKeyBlock)
  OptTensor diag;
  OptTensor alibi_slopes;
  at::ScalarType storage;  // the input dtype: q and k are rounded through it (precision rule)
};

// x W^T rounded through the input dtype and scaled: the queries (scale beta) and keys (scale 1)
// that the reference and the tensor-core kernels use (docs/backward.md, precision rule).
inline at::Tensor rounded_projection(const at::Tensor& x, const at::Tensor& w, at::ScalarType storage, double scale) {
  auto out = at::matmul(x, w.t());
  if (storage != out.scalar_type()) {
    out = out.to(storage).to(out.scalar_type());
  }
  return (scale == 1.0 ? out : out * scale).contiguous();
}

// (B, N, G, E) rows -> (B, G, NB, E, kKeyBlock): each key block transposed into one
// contiguous panel, the last one zero-padded.
inline at::Tensor transposed_key_blocks(const at::Tensor& rows) {
  const int64_t batch = rows.size(0), n = rows.size(1), groups = rows.size(2), width = rows.size(3);
  const int64_t blocks = key_blocks_of(n);
  auto padded = at::zeros({batch, blocks * kKeyBlock, groups, width}, rows.options());
  padded.narrow(1, 0, n).copy_(rows);
  return padded.view({batch, blocks, kKeyBlock, groups, width}).permute({0, 3, 1, 4, 2}).contiguous();
}

inline AttnCallTensors prepare_attention_call(
    const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k, const OptTensor& diag,
    const OptTensor& alibi_slopes, const AttentionSizes& s) {
  const auto acc = accumulation_dtype(x.scalar_type());
  AttnCallTensors t;
  t.context = to_acc(x, acc);
  t.w_q = to_acc(w_q, acc).view({s.heads * s.head_dim, s.dim});
  t.w_k = to_acc(w_k, acc).view({s.heads * s.head_dim, s.dim});
  t.storage = x.scalar_type();
  t.keys = rounded_projection(t.context, t.w_k, t.storage, 1.0);
  t.key_tiles = transposed_key_blocks(t.keys.view({s.batch, s.seq, s.heads, s.head_dim}));
  t.context_tiles = transposed_key_blocks(t.context.unsqueeze(2));
  t.diag = to_acc(diag, acc);
  t.alibi_slopes = to_acc(alibi_slopes, acc);
  return t;
}

inline DiagKind diag_kind_of(DiagMode mode) {
  switch (mode) {
    case DiagMode::kShared: return DiagKind::kShared;
    case DiagMode::kPerHead: return DiagKind::kPerHead;
    case DiagMode::kNone: break;
  }
  return DiagKind::kNone;
}

template <typename T>
AttnCoreInputs<T> core_inputs(const AttnCallTensors& t, const AttentionSizes& s, double scale) {
  AttnCoreInputs<T> in{};
  in.batch = s.batch;
  in.seq = s.seq;
  in.dim = s.dim;
  in.heads = s.heads;
  in.head_dim = s.head_dim;
  in.diag_kind = diag_kind_of(s.diag_mode);
  in.scale = static_cast<T>(scale);
  in.context = t.context.data_ptr<T>();
  in.keys = t.keys.data_ptr<T>();
  in.key_tiles = t.key_tiles.data_ptr<T>();
  in.context_tiles = t.context_tiles.data_ptr<T>();
  in.diag = data_or_null<T>(t.diag);
  in.alibi_slopes = data_or_null<T>(t.alibi_slopes);
  return in;
}

inline int64_t query_blocks(int64_t seq) { return (seq + kQueryBlock - 1) / kQueryBlock; }

// Work is split into this many chunks, one per thread; each chunk owns one workspace (and,
// in the backward, one copy of the key-side sums).
inline int64_t chunk_count(int64_t batch, int64_t seq) {
  const int64_t items = batch * query_blocks(seq);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
}

// Strips (attention_core.h) are kept while they take at most this many bytes per chunk:
// 64 MiB, or CEM_OPS_CPU_STRIP_MB (0 turns them off; tests use it to cover both ways).
inline int64_t strips_within_budget(int64_t strips, int64_t seq, int64_t element_size) {
  const char* env = std::getenv("CEM_OPS_CPU_STRIP_MB");
  const int64_t budget_mb = env != nullptr && *env != '\0' ? std::atoll(env) : 64;
  return strip_elements(strips, seq) * element_size <= (budget_mb << 20) ? strips : 0;
}

// f(chunk, batch_index, query_block) for every work item; chunk c takes the c-th contiguous
// range of items in the folded order of item_of (attention_core.h).
template <typename F>
void for_each_work_item(int64_t batch, int64_t seq, int64_t chunks, const F& f) {
  const int64_t blocks = query_blocks(seq);
  const int64_t items = batch * blocks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t item = items * chunk / chunks; item < items * (chunk + 1) / chunks; ++item) {
        int64_t b = 0, query_block = 0;
        item_of(item, blocks, &b, &query_block);
        f(chunk, b, query_block);
      }
    }
  });
}

}  // namespace cem::cpu
