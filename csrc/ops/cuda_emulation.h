// The switch behind cem_ops.testing.cuda_emulation(): while it is on (per host thread), the CPU
// attention kernel ops hand their calls to the emulated CUDA backend (cem_ops._C_emulated: the
// CUDA glue and kernels built for the CPU, see ops/emulated_op.h), and the public ops keep
// bfloat16/float16 inputs in their dtype as on a GPU. Off by default; nothing else changes.
#pragma once

namespace cem {

bool cuda_emulation_enabled();
bool set_cuda_emulation(bool enabled);  // returns the previous state

}  // namespace cem
