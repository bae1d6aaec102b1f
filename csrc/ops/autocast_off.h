// Kernels compute in their inputs' dtype. Autograd runs a backward pass under the caller's
// torch.autocast state, so without this guard the ATen calls inside a kernel would be re-cast
// to the autocast dtype behind the kernel's back.
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace cem {

struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace cem
