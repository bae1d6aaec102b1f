// Picks the attention core build for this CPU: AVX-512 where available, else AVX2 + FMA, else
// the baseline. CEM_OPS_CPU_ISA=generic|avx2|avx512 overrides the choice (read on every call, so
// tests can cover every build in one process).
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/attention_core.h"

namespace cem::cpu {
namespace generic {
template <typename T>
AttnCoreKernels<T> kernels();
}
namespace avx2 {
template <typename T>
AttnCoreKernels<T> kernels();
}
namespace avx512 {
template <typename T>
AttnCoreKernels<T> kernels();
}

namespace {

bool cpu_supports(const std::string& isa) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

// The build for `isa` when both this binary and this CPU have it, else an empty table.
template <typename T>
AttnCoreKernels<T> build_for(const std::string& isa) {
  const AttnCoreKernels<T> table = isa == "avx512" ? avx512::kernels<T>()
                                   : isa == "avx2" ? avx2::kernels<T>()
                                                   : generic::kernels<T>();
  return table.isa != nullptr && cpu_supports(isa) ? table : AttnCoreKernels<T>{nullptr, nullptr, nullptr};
}

}  // namespace

template <typename T>
AttnCoreKernels<T> attention_core_kernels() {
  const char* forced = std::getenv("CEM_OPS_CPU_ISA");
  const std::string choice = forced == nullptr ? "" : forced;
  if (choice.empty()) {
    for (const char* isa : {"avx512", "avx2"}) {
      const AttnCoreKernels<T> table = build_for<T>(isa);
      if (table.isa != nullptr) return table;
    }
    return generic::kernels<T>();
  }
  if (choice != "generic" && choice != "avx2" && choice != "avx512") {
    throw std::runtime_error("cem_ops: CEM_OPS_CPU_ISA must be 'generic', 'avx2' or 'avx512' (or unset), got '" +
                             choice + "'");
  }
  const AttnCoreKernels<T> table = build_for<T>(choice);
  if (table.isa == nullptr) {
    throw std::runtime_error("cem_ops: CEM_OPS_CPU_ISA=" + choice + ", but this CPU or build has no " + choice +
                             " kernels");
  }
  return table;
}

template AttnCoreKernels<float> attention_core_kernels<float>();
template AttnCoreKernels<double> attention_core_kernels<double>();

}  // namespace cem::cpu
