// Launching an emulated kernel: the replacement for kernel<<<grid, block, smem, stream>>>(args).
// Every thread of every block calls kernel(args...) on its own fiber; the call returns when the
// whole grid has run (emulated launches are synchronous), with what the checks found.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime.h"

namespace cem::emu {

template <class... Params, class... Args>
cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem,
                          Args&&... args) {
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Closure closure{kernel, {std::forward<Args>(args)...}};
  auto body = [](void* c) CEM_EMU_UNCHECKED {
    auto* closure = static_cast<Closure*>(c);
    std::apply(closure->kernel, closure->params);
  };
  return detail::launch(name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem, body, &closure);
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), with the
// emulated device's opt-in limit.
template <class... Params>
cudaError_t set_max_dynamic_smem(void (*kernel)(Params...), int bytes) {
  return detail::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace cem::emu
