// The attention core compiled for AVX2 + FMA through a target pragma rather than build flags,
// so the library still loads on any x86-64 CPU; attention_core_dispatch.cpp picks this build
// only when the CPU reports both features. Elsewhere (other compilers or architectures) the
// table is empty and another build runs.
#include "cpu/attention_core.h"
#include "cpu/attention_core_deps.h"  // before the pragma: library code stays baseline

#define CEM_CPU_ISA avx2
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CEM_CPU_ISA_NAME "avx2"
#define CEM_VEC_BYTES 32
#include "cpu/attention_core_impl.h"
#pragma GCC pop_options
#else
#include "cpu/attention_core_unavailable.h"
#endif
