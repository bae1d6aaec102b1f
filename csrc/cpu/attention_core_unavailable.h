// An empty kernel table for an instruction-set build this compiler or target cannot make
// (attention_core_dispatch.cpp then skips it). The includer defines CEM_CPU_ISA.
#pragma once

#include "cpu/attention_core.h"

namespace cem::cpu::CEM_CPU_ISA {
template <typename T>
AttnCoreKernels<T> kernels() {
  return {nullptr, nullptr, nullptr};
}
template AttnCoreKernels<float> kernels<float>();
template AttnCoreKernels<double> kernels<double>();
}  // namespace cem::cpu::CEM_CPU_ISA
