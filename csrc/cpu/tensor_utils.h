// Small tensor helpers shared by the CPU op glue.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace cem::cpu {

using OptTensor = std::optional<at::Tensor>;

inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

inline OptTensor to_acc(const OptTensor& t, at::ScalarType acc) {
  return t.has_value() ? OptTensor(to_acc(*t, acc)) : std::nullopt;
}

template <typename T>
const T* data_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Step sizes on the host, read once per call.
inline std::vector<double> host_step_sizes(const at::Tensor& step_size) {
  const auto values = step_size.to(at::kDouble).contiguous();
  const double* data = values.data_ptr<double>();
  return std::vector<double>(data, data + values.numel());
}

}  // namespace cem::cpu
