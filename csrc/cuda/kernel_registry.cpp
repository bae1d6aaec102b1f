#include "cuda/kernel_registry.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>
#include <vector>

namespace cem::cuda {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<CemDType, std::vector<AttentionKernelSet>> sets;  // sorted by max_head_dim
};

Registry& registry() {
  static Registry instance;  // constructed on first use: safe from any static initializer
  return instance;
}

}  // namespace

const char* dtype_name(CemDType dtype) {
  switch (dtype) {
    case CemDType::kFloat32: return "fp32";
    case CemDType::kFloat16: return "fp16";
    case CemDType::kBFloat16: return "bf16";
  }
  return "?";
}

bool register_attention_kernels(CemDType dtype, const AttentionKernelSet& set) {
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  auto& list = reg.sets[dtype];
  list.push_back(set);
  std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.max_head_dim < b.max_head_dim; });
  return true;
}

const AttentionKernelSet* find_attention_kernels(CemDType dtype, int head_dim) {
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  const auto it = reg.sets.find(dtype);
  if (it == reg.sets.end()) {
    return nullptr;
  }
  for (const auto& set : it->second) {
    if (head_dim <= set.max_head_dim) {
      return &set;
    }
  }
  return nullptr;
}

std::string describe_attention_kernels() {
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  std::ostringstream out;
  bool first_dtype = true;
  for (const auto& [dtype, list] : reg.sets) {
    out << (first_dtype ? "" : " ") << dtype_name(dtype) << ":";
    first_dtype = false;
    for (size_t i = 0; i < list.size(); ++i) {
      out << (i ? "," : "") << list[i].max_head_dim;
    }
  }
  return out.str();
}

}  // namespace cem::cuda
