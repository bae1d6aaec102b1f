// Every cem operator schema, defined once. Implementations register where they live:
// composites in ops/, CPU kernels in cpu/, CUDA kernels in cuda/, and the Python
// fallback (the reference) for backends without a compiled kernel.
#include <torch/library.h>

TORCH_LIBRARY(cem, m) {
  // Public ops (cem-math.md section 5).
  m.def(
      "attention(Tensor x, Tensor w_q, Tensor w_k, Tensor? diag, Tensor? alibi_slopes, "
      "Tensor? precond_diag, Tensor? precond_lowrank, Tensor step_size, float? scale=None) -> Tensor");
  m.def(
      "attention_energy(Tensor x, Tensor context, Tensor w_q, Tensor w_k, Tensor? diag, "
      "Tensor? alibi_slopes, float? scale=None) -> Tensor");
  m.def(
      "mlp(Tensor x, Tensor w, Tensor v, Tensor? precond_diag, Tensor? precond_lowrank, "
      "Tensor step_size, str activation=\"silu\") -> Tensor");
  m.def("mlp_energy(Tensor x, Tensor context, Tensor w, Tensor v, str activation=\"silu\") -> Tensor");

  // Forward with the state the backward recomputes from (empty tensors when
  // save_for_backward is false), and the explicit backward. See docs/backward.md.
  m.def(
      "attention_fwd(Tensor x, Tensor w_q, Tensor w_k, Tensor? diag, Tensor? alibi_slopes, "
      "Tensor? precond_diag, Tensor? precond_lowrank, Tensor step_size, float? scale, "
      "bool save_for_backward) -> (Tensor out, Tensor iterates, Tensor head_outputs, "
      "Tensor diag_values, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor x, Tensor w_q, Tensor w_k, Tensor? diag, "
      "Tensor? alibi_slopes, Tensor? precond_diag, Tensor? precond_lowrank, Tensor step_size, "
      "float? scale, Tensor iterates, Tensor head_outputs, Tensor diag_values, Tensor lse) -> "
      "(Tensor grad_x, Tensor grad_w_q, Tensor grad_w_k, Tensor? grad_diag, "
      "Tensor? grad_precond_diag, Tensor? grad_precond_lowrank, Tensor grad_step_size)");
  m.def(
      "mlp_fwd(Tensor x, Tensor w, Tensor v, Tensor? precond_diag, Tensor? precond_lowrank, "
      "Tensor step_size, str activation, bool save_for_backward) -> "
      "(Tensor out, Tensor iterates, Tensor neg_grads)");
  m.def(
      "mlp_bwd(Tensor grad_out, Tensor x, Tensor w, Tensor v, Tensor? precond_diag, "
      "Tensor? precond_lowrank, Tensor step_size, str activation, Tensor iterates, "
      "Tensor neg_grads) -> (Tensor grad_x, Tensor grad_w, Tensor grad_v, "
      "Tensor? grad_precond_diag, Tensor? grad_precond_lowrank, Tensor grad_step_size)");
}
