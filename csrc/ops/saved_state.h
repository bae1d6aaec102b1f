// Outputs of attention_fwd / mlp_fwd, allocated once for every backend with the layout that
// docs/backward.md fixes (and the Python fake implementations mirror).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "checks.h"

namespace cem {

struct AttentionState {
  at::Tensor out;           // (B, N, D), dtype of x
  at::Tensor iterates;      // (T-1, B, N, D), dtype of x
  at::Tensor head_outputs;  // (T, B, N, H, Dh), dtype of x
  at::Tensor diag_values;   // (T, B, N, D), dtype of x; empty without a diagonal
  at::Tensor lse;           // (T, B, H, N), accumulation dtype

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {out, iterates, head_outputs, diag_values, lse};
  }
};

struct MlpState {
  at::Tensor out;        // (B, N, D)
  at::Tensor iterates;   // (T-1, B, N, D)
  at::Tensor neg_grads;  // (T, B, N, D): G(x^t)

  std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple() const { return {out, iterates, neg_grads}; }
};

// Without save_for_backward every state tensor is empty (0 elements) and only `out` is real.
AttentionState allocate_attention_state(const at::Tensor& x, const AttentionSizes& sizes, bool save);
MlpState allocate_mlp_state(const at::Tensor& x, const MlpSizes& sizes, bool save);

// The backward ops take that state back as arguments: check that it is what the forward saved
// (shape, dtype, device; any strides), with an error naming the argument.
void check_attention_state(
    const char* op, const AttentionSizes& sizes, const at::Tensor& x, const at::Tensor& grad_out,
    const at::Tensor& iterates, const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse);
void check_mlp_state(
    const char* op, const MlpSizes& sizes, const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& iterates,
    const at::Tensor& neg_grads);

}  // namespace cem
