// Argument validation shared by every cem op and backend: one place that turns bad input
// into a clear error naming the argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace cem {

enum class DiagMode { kNone, kShared, kPerHead };

struct AttentionSizes {
  int64_t batch, seq, dim, heads, head_dim, rank, steps;
  DiagMode diag_mode;
};

// cem::attention_cached: the chunk's sizes (seq is the chunk length C) and the cache capacity.
struct CachedAttentionSizes : AttentionSizes {
  int64_t capacity;
};

struct MlpSizes {
  int64_t batch, seq, dim, hidden, rank, steps;
};

enum class Activation { kSilu, kGelu, kRelu };

AttentionSizes check_attention_args(
    const char* op, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const std::optional<at::Tensor>& diag, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale);

// Shapes, dtypes and devices, and the cache lengths' values when they are on the CPU: every row
// needs 0 <= length and length + C <= capacity. Lengths on a GPU are checked by the kernels
// (reading them here would cost a host sync per call); see docs/decoding.md.
CachedAttentionSizes check_attention_cached_args(
    const char* op, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const at::Tensor& cache_keys, const std::optional<at::Tensor>& cache_context, const at::Tensor& cache_lengths,
    const std::optional<at::Tensor>& diag, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale);

void check_attention_energy_args(
    const char* op, const at::Tensor& x, const at::Tensor& context, const at::Tensor& w_q,
    const at::Tensor& w_k, const std::optional<at::Tensor>& diag,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> scale);

MlpSizes check_mlp_args(
    const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& v,
    const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
    const at::Tensor& step_size, const std::string& activation);

void check_mlp_energy_args(
    const char* op, const at::Tensor& x, const at::Tensor& context, const at::Tensor& w,
    const at::Tensor& v, const std::string& activation);

Activation parse_activation(const char* op, const std::string& activation);

// Whether a tensor is being traced with symbolic sizes (torch.compile with dynamic shapes,
// torch.export): reading its sizes as integers would pin them to the traced values.
bool has_symbolic_sizes(const at::Tensor& t);

// float32 for float32/bfloat16/float16 inputs, float64 for float64 (cem-math.md section 6).
at::ScalarType accumulation_dtype(at::ScalarType dtype);

// Whether the public ops run bfloat16/float16 inputs on float32 copies: on the CPU, where no
// tensor core wants rounded operands, so rounding inside the recursion would only cost
// accuracy (gradients most of all). The CUDA kernels keep the rounding points of the
// precision rule (docs/backward.md), and so does the CPU while it emulates them.
bool computes_in_float32(const at::Tensor& x);
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t);

// beta: Dh^-1/2 unless given.
double resolve_scale(std::optional<double> scale, int64_t head_dim);

}  // namespace cem
