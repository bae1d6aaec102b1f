// The CUDA emulation: device code (.cu/.cuh) compiled by the host compiler runs on the CPU, each
// CUDA thread a fiber, with shared-memory race, bounds and alignment checks and divergent-barrier
// detection. Kernel sources reach it through cuda/device_runtime.cuh when CEM_CUDA_EMULATION is
// defined; exactly one translation unit of the program includes implementation.h.
// docs/cuda-emulation.md describes the model and its limits.
#pragma once

#include "builtins.h"
#include "launch.h"
#include "ptx.h"
