// The one translation unit of cem_ops._C_emulated that holds the emulator (compiled without the
// access instrumentation the kernel units get).
#include "cuda/emulation/implementation.h"
