#include "saved_state.h"

#include <ATen/ATen.h>

#include <vector>

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

namespace {

void check_state_tensor(
    const char* op, const char* name, const at::Tensor& t, std::vector<int64_t> shape, at::ScalarType dtype,
    const at::Tensor& x) {
  TORCH_CHECK_VALUE(
      t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
      " (the saved state of the forward op with save_for_backward=True, docs/backward.md), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(
      t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ", t.device());
}

}  // namespace

void check_attention_state(
    const char* op, const AttentionSizes& s, const at::Tensor& x, const at::Tensor& grad_out,
    const at::Tensor& iterates, const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse) {
  const auto dtype = x.scalar_type();
  check_state_tensor(op, "grad_out", grad_out, {s.batch, s.seq, s.dim}, dtype, x);
  check_state_tensor(op, "iterates", iterates, {s.steps - 1, s.batch, s.seq, s.dim}, dtype, x);
  check_state_tensor(op, "head_outputs", head_outputs, {s.steps, s.batch, s.seq, s.heads, s.head_dim}, dtype, x);
  if (s.diag_mode == DiagMode::kNone) {
    TORCH_CHECK_VALUE(
        diag_values.numel() == 0, op, ": diag_values must be empty without a diagonal, got shape ",
        diag_values.sizes());
  } else {
    check_state_tensor(op, "diag_values", diag_values, {s.steps, s.batch, s.seq, s.dim}, dtype, x);
  }
  check_state_tensor(op, "lse", lse, {s.steps, s.batch, s.heads, s.seq}, accumulation_dtype(dtype), x);
}

void check_mlp_state(
    const char* op, const MlpSizes& s, const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& iterates,
    const at::Tensor& neg_grads) {
  const auto dtype = x.scalar_type();
  check_state_tensor(op, "grad_out", grad_out, {s.batch, s.seq, s.dim}, dtype, x);
  check_state_tensor(op, "iterates", iterates, {s.steps - 1, s.batch, s.seq, s.dim}, dtype, x);
  check_state_tensor(op, "neg_grads", neg_grads, {s.steps, s.batch, s.seq, s.dim}, dtype, x);
}

}  // namespace cem
