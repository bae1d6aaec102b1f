// What the ATen glue takes from the CUDA runtime, in one place: the device guard, the stream
// kernels launch on, the device's opt-in shared-memory limit and SM count, synchronising for the
// debug switch, the text of a launch error and the dispatch key the ops register under. On a GPU these are c10's and cudart's. In the emulated
// backend (CEM_CUDA_EMULATION) the same glue runs on CPU tensors: no guard, no stream, the
// emulated device's limit and report, and the ops register as cem_emulated::* on the CPU key.
#pragma once

#include <c10/core/Device.h>
#include <driver_types.h>

#include <string>

#ifdef CEM_CUDA_EMULATION
#include "cuda/emulation/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace cem::cuda {

#ifdef CEM_CUDA_EMULATION

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline int max_dynamic_smem_optin() { return ::cem::emu::device_properties().max_dynamic_smem_optin; }
inline int multiprocessor_count() { return ::cem::emu::device_properties().multiprocessors; }
inline cudaError_t synchronize_and_check(cudaStream_t) { return cudaSuccess; }  // launches are synchronous
inline std::string launch_error_text(cudaError_t err) {
  const std::string& report = ::cem::emu::last_launch_report();
  return report.empty() ? ::cem::emu::error_string(err) : report;
}
#define CEM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(cem_emulated, CPU, m)

#else

using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
int max_dynamic_smem_optin();  // of the current device (attention_setup.cpp)
int multiprocessor_count();    // of the current device
inline cudaError_t synchronize_and_check(cudaStream_t stream) {
  const cudaError_t err = cudaStreamSynchronize(stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}
inline std::string launch_error_text(cudaError_t err) { return cudaGetErrorString(err); }
#define CEM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(cem, CUDA, m)

#endif

}  // namespace cem::cuda
