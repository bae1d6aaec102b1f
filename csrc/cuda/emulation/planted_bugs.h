// Bugs planted into the attention kernels' launch parameters, for the tests that prove the
// checker catches them (tests/test_cuda_emulation.py). Only the emulated backend has this: the
// generated emulation units include it, so the launch helper (cuda/device_runtime.cuh) finds
// plant_bugs() for CemAttnParams; the GPU build never sees it.
#pragma once

#include <string>

#include "cuda/attention_params.h"

namespace cem::cuda {

enum class PlantedBug {
  kNone,
  kExtraKeyRow,       // p.seq + 1: tile loads read one key row past the end of K (a ragged-edge overrun)
  kForceVectorLoads,  // p.vec_loads = true whatever the alignment: 16-byte loads of unaligned rows
};

void set_planted_bug(PlantedBug bug);
PlantedBug planted_bug();

// Applied to every CemAttnParams an emulated launch passes.
void plant_bugs(CemAttnParams& p);

}  // namespace cem::cuda
