// The cache layout cem::attention_cached's kernels read: each batch row's positions contiguous,
// rows any stride apart. A module passes a view of its preallocated cache narrowed to the
// positions in use, (B, used, ...) of (B, capacity, ...) storage, which this keeps without a copy.
#pragma once

#include <ATen/core/Tensor.h>

namespace cem {

inline at::Tensor rows_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return t.contiguous();
    expected *= t.size(d);
  }
  return t;
}

}  // namespace cem
