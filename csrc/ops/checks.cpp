#include "checks.h"
#include "cuda_emulation.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace cem {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
      ": ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

// Every tensor argument shares x's dtype and device: no silent promotion or copies.
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
      "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(
      t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
      t.device());
}

void check_sequence_input(const char* op, const char* name, const at::Tensor& x) {
  check_floating(op, name, x);
  TORCH_CHECK_VALUE(
      x.dim() == 3, op, ": ", name, " must be a 3-D tensor (B, N, D), got shape ", shape_of(x));
  TORCH_CHECK_VALUE(x.size(2) >= 1, op, ": ", name, " must have D >= 1 features, got shape ", shape_of(x));
}

void check_projections(const char* op, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k) {
  check_like_x(op, "w_q", w_q, x);
  check_like_x(op, "w_k", w_k, x);
  TORCH_CHECK_VALUE(
      w_q.dim() == 3 && w_q.size(2) == x.size(2) && w_q.size(0) >= 1 && w_q.size(1) >= 1, op,
      ": w_q must have shape (H, Dh, D) with H, Dh >= 1 and D = ", x.size(2),
      " (the last dimension of x), got ", shape_of(w_q));
  TORCH_CHECK_VALUE(
      w_k.sizes() == w_q.sizes(), op, ": w_k must have the shape of w_q ", shape_of(w_q), ", got ",
      shape_of(w_k));
}

DiagMode check_diag(const char* op, const std::optional<at::Tensor>& diag, const at::Tensor& x, int64_t heads) {
  if (!diag.has_value()) {
    return DiagMode::kNone;
  }
  const auto& d = *diag;
  check_like_x(op, "diag", d, x);
  const int64_t dim = x.size(2);
  if (d.dim() == 1 && d.size(0) == dim) {
    return DiagMode::kShared;
  }
  TORCH_CHECK_VALUE(
      d.dim() == 2 && d.size(0) == heads && d.size(1) == dim, op,
      ": diag must have shape (D,) = (", dim, ",) for a shared diagonal or (H, D) = (", heads, ", ", dim,
      ") for one per head, got ", shape_of(d));
  return DiagMode::kPerHead;
}

void check_alibi(const char* op, const std::optional<at::Tensor>& slopes, const at::Tensor& x, int64_t heads) {
  if (!slopes.has_value()) {
    return;
  }
  check_like_x(op, "alibi_slopes", *slopes, x);
  TORCH_CHECK_VALUE(
      slopes->dim() == 1 && slopes->size(0) == heads, op, ": alibi_slopes must have shape (H,) = (", heads,
      ",), got ", shape_of(*slopes));
}

void check_scale(const char* op, std::optional<double> scale) {
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(
        std::isfinite(*scale) && *scale > 0, op, ": scale must be a finite positive number or None, got ",
        *scale);
  }
}

// Shared by attention and mlp: the preconditioner P = diag(p) + U U^T and the step sizes.
int64_t check_preconditioner_and_steps(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& precond_diag,
    const std::optional<at::Tensor>& precond_lowrank, const at::Tensor& step_size, int64_t* rank) {
  const int64_t dim = x.size(2);
  if (precond_diag.has_value()) {
    check_like_x(op, "precond_diag", *precond_diag, x);
    TORCH_CHECK_VALUE(
        precond_diag->dim() == 1 && precond_diag->size(0) == dim, op, ": precond_diag must have shape (D,) = (",
        dim, ",), got ", shape_of(*precond_diag));
  }
  *rank = 0;
  if (precond_lowrank.has_value()) {
    check_like_x(op, "precond_lowrank", *precond_lowrank, x);
    TORCH_CHECK_VALUE(
        precond_lowrank->dim() == 2 && precond_lowrank->size(0) == dim && precond_lowrank->size(1) >= 1, op,
        ": precond_lowrank must have shape (D, R) with D = ", dim,
        " and R >= 1 (pass None for no low-rank part), got ", shape_of(*precond_lowrank));
    *rank = precond_lowrank->size(1);
  }
  check_like_x(op, "step_size", step_size, x);
  TORCH_CHECK_VALUE(
      step_size.dim() == 1 && step_size.size(0) >= 1, op,
      ": step_size must be a 1-D tensor of T >= 1 step sizes, got shape ", shape_of(step_size));
  return step_size.size(0);
}

void check_context(const char* op, const at::Tensor& context, const at::Tensor& x) {
  check_like_x(op, "context", context, x);
  TORCH_CHECK_VALUE(
      context.sizes() == x.sizes(), op, ": context must have the shape of x ", shape_of(x), ", got ",
      shape_of(context));
}

void check_mlp_weights(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& v) {
  check_like_x(op, "w", w, x);
  check_like_x(op, "v", v, x);
  TORCH_CHECK_VALUE(
      w.dim() == 2 && w.size(1) == x.size(2) && w.size(0) >= 1, op,
      ": w must have shape (M, D) with M >= 1 and D = ", x.size(2), " (the last dimension of x), got ",
      shape_of(w));
  TORCH_CHECK_VALUE(
      v.sizes() == w.sizes(), op, ": v must have the shape of w ", shape_of(w), ", got ", shape_of(v));
}

}  // namespace

Activation parse_activation(const char* op, const std::string& activation) {
  TORCH_CHECK_VALUE(
      activation == "silu" || activation == "gelu" || activation == "relu", op,
      ": activation must be one of 'silu', 'gelu', 'relu', got '", activation, "'");
  if (activation == "silu") return Activation::kSilu;
  return activation == "gelu" ? Activation::kGelu : Activation::kRelu;
}

AttentionSizes check_attention_args(
    const char* op, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const std::optional<at::Tensor>& diag, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale) {
  check_sequence_input(op, "x", x);
  check_projections(op, x, w_q, w_k);
  AttentionSizes sizes{};
  sizes.batch = x.size(0);
  sizes.seq = x.size(1);
  sizes.dim = x.size(2);
  sizes.heads = w_q.size(0);
  sizes.head_dim = w_q.size(1);
  sizes.diag_mode = check_diag(op, diag, x, sizes.heads);
  check_alibi(op, alibi_slopes, x, sizes.heads);
  sizes.steps = check_preconditioner_and_steps(op, x, precond_diag, precond_lowrank, step_size, &sizes.rank);
  check_scale(op, scale);
  return sizes;
}

CachedAttentionSizes check_attention_cached_args(
    const char* op, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const at::Tensor& cache_keys, const std::optional<at::Tensor>& cache_context, const at::Tensor& cache_lengths,
    const std::optional<at::Tensor>& diag, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
    const at::Tensor& step_size, std::optional<double> scale) {
  CachedAttentionSizes s{};
  static_cast<AttentionSizes&>(s) =
      check_attention_args(op, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  check_like_x(op, "cache_keys", cache_keys, x);
  TORCH_CHECK_VALUE(
      cache_keys.dim() == 4 && cache_keys.size(0) == s.batch && cache_keys.size(2) == s.heads &&
          cache_keys.size(3) == s.head_dim,
      op, ": cache_keys must have shape (B, capacity, H, Dh) = (", s.batch, ", capacity, ", s.heads, ", ", s.head_dim,
      "), got ", shape_of(cache_keys));
  s.capacity = cache_keys.size(1);
  if (s.diag_mode == DiagMode::kNone) {
    TORCH_CHECK_VALUE(!cache_context.has_value(), op,
                      ": cache_context must be None without a diagonal (the scores read only the keys)");
  } else {
    TORCH_CHECK_VALUE(cache_context.has_value(), op,
                      ": cache_context (B, capacity, D) is needed with a diagonal (its scores read the context)");
    check_like_x(op, "cache_context", *cache_context, x);
    TORCH_CHECK_VALUE(
        cache_context->dim() == 3 && cache_context->size(0) == s.batch && cache_context->size(1) == s.capacity &&
            cache_context->size(2) == s.dim,
        op, ": cache_context must have shape (B, capacity, D) = (", s.batch, ", ", s.capacity, ", ", s.dim,
        ") like cache_keys, got ", shape_of(*cache_context));
  }
  TORCH_CHECK_TYPE(cache_lengths.scalar_type() == at::kLong, op, ": cache_lengths must be int64, got ",
                   cache_lengths.scalar_type());
  TORCH_CHECK_VALUE(cache_lengths.dim() == 1 && cache_lengths.size(0) == s.batch, op,
                    ": cache_lengths must have shape (B,) = (", s.batch, ",), got ", shape_of(cache_lengths));
  TORCH_CHECK_VALUE(cache_lengths.device() == x.device() || cache_lengths.device().is_cpu(), op,
                    ": cache_lengths must be on the device of x (", x.device(), ") or on the CPU, got ",
                    cache_lengths.device());
  TORCH_CHECK_VALUE(s.seq <= s.capacity, op, ": the chunk of ", s.seq, " positions does not fit a cache of capacity ",
                    s.capacity);
  if (cache_lengths.device().is_cpu() && !has_symbolic_sizes(x)) {
    const auto lengths = cache_lengths.contiguous();
    const int64_t* n = lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < s.batch; ++b) {
      TORCH_CHECK_VALUE(n[b] >= 0 && n[b] + s.seq <= s.capacity, op, ": cache_lengths[", b, "] = ", n[b],
                        " is out of range: a chunk of ", s.seq, " positions needs 0 <= length <= capacity - ", s.seq,
                        " = ", s.capacity - s.seq);
    }
  }
  return s;
}

void check_attention_energy_args(
    const char* op, const at::Tensor& x, const at::Tensor& context, const at::Tensor& w_q,
    const at::Tensor& w_k, const std::optional<at::Tensor>& diag,
    const std::optional<at::Tensor>& alibi_slopes, std::optional<double> scale) {
  check_sequence_input(op, "x", x);
  check_context(op, context, x);
  check_projections(op, x, w_q, w_k);
  check_diag(op, diag, x, w_q.size(0));
  check_alibi(op, alibi_slopes, x, w_q.size(0));
  check_scale(op, scale);
}

MlpSizes check_mlp_args(
    const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& v,
    const std::optional<at::Tensor>& precond_diag, const std::optional<at::Tensor>& precond_lowrank,
    const at::Tensor& step_size, const std::string& activation) {
  check_sequence_input(op, "x", x);
  check_mlp_weights(op, x, w, v);
  parse_activation(op, activation);
  MlpSizes sizes{};
  sizes.batch = x.size(0);
  sizes.seq = x.size(1);
  sizes.dim = x.size(2);
  sizes.hidden = w.size(0);
  sizes.steps = check_preconditioner_and_steps(op, x, precond_diag, precond_lowrank, step_size, &sizes.rank);
  return sizes;
}

void check_mlp_energy_args(
    const char* op, const at::Tensor& x, const at::Tensor& context, const at::Tensor& w,
    const at::Tensor& v, const std::string& activation) {
  check_sequence_input(op, "x", x);
  check_context(op, context, x);
  check_mlp_weights(op, x, w, v);
  parse_activation(op, activation);
}

bool has_symbolic_sizes(const at::Tensor& t) { return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

bool computes_in_float32(const at::Tensor& x) {
  return x.device().is_cpu() && !cuda_emulation_enabled() &&
         (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

}  // namespace cem
