// The schema of every cem operator, written once. bindings.cpp defines them in the cem
// namespace; the emulated CUDA backend (cuda/emulation/emulated_module.cpp) defines the kernel
// ops it implements under cem_emulated with the same signatures.
#pragma once

namespace cem::schemas {

// Public ops (cem-math.md section 5).
inline constexpr const char* kAttention =
    "attention(Tensor x, Tensor w_q, Tensor w_k, Tensor? diag, Tensor? alibi_slopes, "
    "Tensor? precond_diag, Tensor? precond_lowrank, Tensor step_size, float? scale=None) -> Tensor";
inline constexpr const char* kAttentionEnergy =
    "attention_energy(Tensor x, Tensor context, Tensor w_q, Tensor w_k, Tensor? diag, "
    "Tensor? alibi_slopes, float? scale=None) -> Tensor";
inline constexpr const char* kMlp =
    "mlp(Tensor x, Tensor w, Tensor v, Tensor? precond_diag, Tensor? precond_lowrank, "
    "Tensor step_size, str activation=\"silu\") -> Tensor";
inline constexpr const char* kMlpEnergy =
    "mlp_energy(Tensor x, Tensor context, Tensor w, Tensor v, str activation=\"silu\") -> Tensor";

// The rows of a chunk of new positions against a cache of earlier ones (docs/decoding.md): the
// chunk's Delta and its keys, to be appended to the cache. Inference only.
inline constexpr const char* kAttentionCached =
    "attention_cached(Tensor x, Tensor w_q, Tensor w_k, Tensor cache_keys, Tensor? cache_context, "
    "Tensor cache_lengths, Tensor? diag, Tensor? alibi_slopes, Tensor? precond_diag, Tensor? precond_lowrank, "
    "Tensor step_size, float? scale=None) -> (Tensor out, Tensor keys)";

// Forward with the state the backward recomputes from (empty tensors when save_for_backward is
// false), and the explicit backward. See docs/backward.md.
inline constexpr const char* kAttentionFwd =
    "attention_fwd(Tensor x, Tensor w_q, Tensor w_k, Tensor? diag, Tensor? alibi_slopes, "
    "Tensor? precond_diag, Tensor? precond_lowrank, Tensor step_size, float? scale, "
    "bool save_for_backward) -> (Tensor out, Tensor iterates, Tensor head_outputs, "
    "Tensor diag_values, Tensor lse)";
inline constexpr const char* kAttentionBwd =
    "attention_bwd(Tensor grad_out, Tensor x, Tensor w_q, Tensor w_k, Tensor? diag, "
    "Tensor? alibi_slopes, Tensor? precond_diag, Tensor? precond_lowrank, Tensor step_size, "
    "float? scale, Tensor iterates, Tensor head_outputs, Tensor diag_values, Tensor lse) -> "
    "(Tensor grad_x, Tensor grad_w_q, Tensor grad_w_k, Tensor? grad_diag, "
    "Tensor? grad_precond_diag, Tensor? grad_precond_lowrank, Tensor grad_step_size)";
inline constexpr const char* kMlpFwd =
    "mlp_fwd(Tensor x, Tensor w, Tensor v, Tensor? precond_diag, Tensor? precond_lowrank, "
    "Tensor step_size, str activation, bool save_for_backward) -> "
    "(Tensor out, Tensor iterates, Tensor neg_grads)";
inline constexpr const char* kMlpBwd =
    "mlp_bwd(Tensor grad_out, Tensor x, Tensor w, Tensor v, Tensor? precond_diag, "
    "Tensor? precond_lowrank, Tensor step_size, str activation, Tensor iterates, "
    "Tensor neg_grads) -> (Tensor grad_x, Tensor grad_w, Tensor grad_v, "
    "Tensor? grad_precond_diag, Tensor? grad_precond_lowrank, Tensor grad_step_size)";

}  // namespace cem::schemas
