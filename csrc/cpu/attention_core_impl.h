// Instantiates the attention core for one instruction set: included only by
// attention_core_generic.cpp and attention_core_avx2.cpp, which define CEM_CPU_ISA and
// CEM_VEC_BYTES first.
#pragma once

#include "cpu/attention_backward_block.h"
#include "cpu/attention_forward_block.h"

namespace cem::cpu::CEM_CPU_ISA {

template <typename T>
AttnCoreKernels<T> kernels() {
  return {CEM_CPU_ISA_NAME, &attention_forward_block<T>, &attention_backward_block<T>};
}

template AttnCoreKernels<float> kernels<float>();
template AttnCoreKernels<double> kernels<double>();

}  // namespace cem::cpu::CEM_CPU_ISA
