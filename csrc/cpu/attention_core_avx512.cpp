// The attention core compiled for AVX-512 (16 float lanes) through a target pragma, like the
// AVX2 build; attention_core_dispatch.cpp prefers it where the CPU reports AVX-512F.
#include "cpu/attention_core.h"
#include "cpu/attention_core_deps.h"  // before the pragma: library code stays baseline

#define CEM_CPU_ISA avx512
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define CEM_CPU_ISA_NAME "avx512"
#define CEM_VEC_BYTES 64
#include "cpu/attention_core_impl.h"
#pragma GCC pop_options
#else
#include "cpu/attention_core_unavailable.h"
#endif
