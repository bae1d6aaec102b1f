// What kernel sources include instead of the CUDA headers, so that the same .cu/.cuh files build
// with nvcc for a GPU and with the host compiler for the emulated backend (CEM_CUDA_EMULATION,
// cuda/emulation/). Two seams live here: the base of a launch's dynamic shared memory, and the
// one launch helper that replaces <<<>>>.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef CEM_CUDA_EMULATION
#include "cuda/emulation/emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <tuple>
#include <type_traits>
#include <utility>

namespace cem::cuda {

#ifdef CEM_CUDA_EMULATION

inline unsigned char* dynamic_smem() { return ::cem::emu::detail::dynamic_smem(); }

// Launch arguments pass through plant_bugs() (found by argument-dependent lookup): a no-op, unless
// the unit declares an overload for its parameter struct (cuda/emulation/planted_bugs.h).
template <class T>
inline void plant_bugs(T&) {}

#else

extern __shared__ __align__(128) unsigned char cem_dynamic_smem[];

__device__ __forceinline__ unsigned char* dynamic_smem() { return cem_dynamic_smem; }

#endif

// Launches kernel<<<grid, block, smem, stream>>>(args...) and returns its launch error. An empty
// grid is a no-op. `smem_attribute` is the kernel's opt-in dynamic shared-memory size: above
// 48 KiB a kernel must declare it, per device, so it is set on every launch (cheap), always to the
// same value per kernel so that concurrent host threads never shrink it under each other.
template <class... Params, class... Args>
cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, int smem_attribute,
                          int smem, cudaStream_t stream, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    return cudaSuccess;
  }
#ifdef CEM_CUDA_EMULATION
  (void)stream;  // emulated launches run to completion on the calling host thread
  cudaError_t err = ::cem::emu::set_max_dynamic_smem(kernel, smem_attribute);
  if (err != cudaSuccess) {
    return err;
  }
  std::tuple<std::decay_t<Params>...> params{std::forward<Args>(args)...};
  std::apply([](auto&... p) { (plant_bugs(p), ...); }, params);
  return std::apply(
      [&](auto&... p) { return ::cem::emu::launch_kernel(name, kernel, grid, block, static_cast<size_t>(smem), p...); },
      params);
#else
  (void)name;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_attribute);
  if (err != cudaSuccess) {
    return err;
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// Resident blocks per SM of `kernel` with `threads` threads and `smem` bytes of dynamic shared
// memory (the occupancy API; in emulation, the emulated device's thread and shared-memory limits).
template <class... Params>
int resident_blocks(void (*kernel)(Params...), int threads, int smem_attribute, int smem) {
#ifdef CEM_CUDA_EMULATION
  (void)kernel;
  (void)smem_attribute;
  const auto& device = ::cem::emu::device_properties();
  const int by_threads = device.max_threads_per_multiprocessor / threads;
  const int by_smem = smem > 0 ? device.smem_per_multiprocessor / smem : by_threads;
  return by_threads < by_smem ? (by_threads > 0 ? by_threads : 1) : (by_smem > 0 ? by_smem : 1);
#else
  int blocks = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_attribute) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();  // an estimate only: clear the error
    return 1;
  }
  return blocks > 0 ? blocks : 1;
#endif
}

}  // namespace cem::cuda
