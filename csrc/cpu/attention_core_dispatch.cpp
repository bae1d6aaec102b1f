// Picks the attention core build for this CPU: AVX2 + FMA when available, else the baseline.
// CEM_OPS_CPU_ISA=generic|avx2 overrides the choice (read on every call, so tests can cover
// both builds in one process).
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

namespace {

bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

template <typename T>
AttnCoreKernels<T> attention_core_kernels() {
  const AttnCoreKernels<T> wide = avx2::kernels<T>();
  const bool wide_ok = wide.isa != nullptr && cpu_has_avx2_fma();
  const char* forced = std::getenv("CEM_OPS_CPU_ISA");
  const std::string choice = forced == nullptr ? "" : forced;
  if (choice.empty()) {
    return wide_ok ? wide : generic::kernels<T>();
  }
  if (choice == "generic") {
    return generic::kernels<T>();
  }
  if (choice == "avx2") {
    if (!wide_ok) {
      throw std::runtime_error("cem_ops: CEM_OPS_CPU_ISA=avx2, but this CPU or build has no AVX2 + FMA kernels");
    }
    return wide;
  }
  throw std::runtime_error("cem_ops: CEM_OPS_CPU_ISA must be 'generic' or 'avx2' (or unset), got '" + choice + "'");
}

template AttnCoreKernels<float> attention_core_kernels<float>();
template AttnCoreKernels<double> attention_core_kernels<double>();

}  // namespace cem::cpu
