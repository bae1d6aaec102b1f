#include "saved_state.h"

#include <ATen/ATen.h>

namespace cem {

AttentionState allocate_attention_state(const at::Tensor& x, const AttentionSizes& s, bool save) {
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(accumulation_dtype(x.scalar_type()));
  AttentionState state;
  state.out = at::empty({s.batch, s.seq, s.dim}, opts);
  if (!save) {
    state.iterates = at::empty({0}, opts);
    state.head_outputs = at::empty({0}, opts);
    state.diag_values = at::empty({0}, opts);
    state.lse = at::empty({0}, acc_opts);
    return state;
  }
  state.iterates = at::empty({s.steps - 1, s.batch, s.seq, s.dim}, opts);
  state.head_outputs = at::empty({s.steps, s.batch, s.seq, s.heads, s.head_dim}, opts);
  state.diag_values = s.diag_mode == DiagMode::kNone ? at::empty({0}, opts)
                                                     : at::empty({s.steps, s.batch, s.seq, s.dim}, opts);
  state.lse = at::empty({s.steps, s.batch, s.heads, s.seq}, acc_opts);
  return state;
}

MlpState allocate_mlp_state(const at::Tensor& x, const MlpSizes& s, bool save) {
  const auto opts = x.options();
  MlpState state;
  state.out = at::empty({s.batch, s.seq, s.dim}, opts);
  if (!save) {
    state.iterates = at::empty({0}, opts);
    state.neg_grads = at::empty({0}, opts);
    return state;
  }
  state.iterates = at::empty({s.steps - 1, s.batch, s.seq, s.dim}, opts);
  state.neg_grads = at::empty({s.steps, s.batch, s.seq, s.dim}, opts);
  return state;
}

}  // namespace cem
