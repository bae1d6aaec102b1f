// The cem_emulated:: twin of a kernel op (registered by cem_ops._C_emulated), typed like the CPU
// kernel that redirects to it while CUDA emulation is on (ops/cuda_emulation.h).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "ops/cuda_emulation.h"

namespace cem {

template <class Signature>
c10::TypedOperatorHandle<Signature> emulated_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), name, " is not registered: CUDA emulation is on but cem_ops._C_emulated is not "
              "loaded (use cem_ops.testing.cuda_emulation())");
  return handle->typed<Signature>();
}

}  // namespace cem
