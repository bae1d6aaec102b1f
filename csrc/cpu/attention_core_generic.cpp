// The attention core for the baseline instruction set of the target (SSE2 on x86-64): runs
// on any CPU of the architecture.
#include "cpu/attention_core_deps.h"

#define CEM_CPU_ISA generic
#define CEM_CPU_ISA_NAME "generic"
#define CEM_VEC_BYTES 16
#include "cpu/attention_core_impl.h"
