// The emulator's checks, one small kernel per kind of bug, each next to its correct twin: the
// buggy kernel must fail with the named report, the correct one must run clean. Built for the
// emulated backend only (tests/test_emulator.py compiles and runs it).
//
// Usage: checker_cases. One line per case; exit status 1 if any case misbehaves.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/primitives.cuh"

using cem::cuda::dynamic_smem;
using cem::cuda::launch_kernel;
namespace ptx = cem::cuda::ptx;

int failures = 0;

// A launch must fail with a report containing `needle`, or (needle == nullptr) run clean.
void expect(const char* name, cudaError_t err, const char* needle) {
  const std::string& report = cem::emu::last_launch_report();
  const bool ok = needle == nullptr ? err == cudaSuccess && report.empty()
                                    : err != cudaSuccess && report.find(needle) != std::string::npos;
  std::printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name,
              report.empty() ? "(clean)" : report.substr(0, report.find('\n', report.find('\n') + 1)).c_str());
  failures += ok ? 0 : 1;
}

template <class... Params, class... Args>
cudaError_t run(void (*kernel)(Params...), int threads, int smem, Args... args) {
  return launch_kernel("checker_case", kernel, dim3(1), dim3(threads), smem, smem, nullptr, args...);
}

// ---- shared-memory races -----------------------------------------------------------------------

__global__ void neighbour_read(float* out, bool barrier) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  out[t] = s[(t + n - 1) % n];
}

// Each thread overwrites the slot its predecessor read (threads resume in order: a WAR).
__global__ void overwrite_after_read(float* out, bool barrier) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 1.f;
  __syncthreads();
  out[t] = s[t];
  if (barrier) __syncthreads();
  s[(t + n - 1) % n] = 2.f;
}

__global__ void same_word(float* out, bool distinct) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  s[distinct ? threadIdx.x : 0] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[0];
}

__global__ void lane_exchange(float* out, bool syncwarp) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (syncwarp) __syncwarp();
  out[t] = s[t ^ 1];
}

// Lanes exchange in pairs with a __syncwarp naming only the pair: ordered within it.
__global__ void pair_exchange(float* out, bool other_pair) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  __syncwarp(3u << (t & ~1));
  out[t] = s[other_pair ? t ^ 2 : t ^ 1];
}

__global__ void half_words(float* out) {  // neighbouring 2-byte stores by different threads: no race
  auto* s = reinterpret_cast<__half*>(dynamic_smem());
  s[threadIdx.x] = __float2half_rn(1.f);
  __syncthreads();
  out[threadIdx.x] = __half2float(s[threadIdx.x ^ 1]);
}

// ---- bounds and alignment ----------------------------------------------------------------------

__global__ void shared_index(float* out, int index) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[index];
}

__global__ void shared_vector(float* out, int byte_offset) {
  unsigned char* s = dynamic_smem();
  for (int i = threadIdx.x; i < 64; i += blockDim.x) reinterpret_cast<unsigned*>(s)[i] = 0;
  __syncthreads();
  // A 16-byte copy, as tile loads do (a vector access on the device: ld.shared.v4).
  reinterpret_cast<uint4*>(out)[threadIdx.x] = *reinterpret_cast<const uint4*>(s + byte_offset);
}

__global__ void global_vector(const float* in, float* out, int element_offset) {
  reinterpret_cast<uint4*>(out)[threadIdx.x] = *reinterpret_cast<const uint4*>(in + element_offset + 4 * threadIdx.x);
}

// ---- barriers and warp operations --------------------------------------------------------------

__global__ void early_exit_barrier(float* out, int exits_below) {
  if (static_cast<int>(threadIdx.x) < exits_below) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void two_barriers(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_source(float* out, int source) {
  const unsigned mask = 0x0000ffffu;
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(mask, static_cast<float>(threadIdx.x), source);
}

__global__ void mixed_collectives(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void warp_reduce(const float* in, float* out) {  // everything right: a clean run
  float v = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.f);
  if (threadIdx.x == 0) {
    out[0] = v;
    out[1] = static_cast<float>(__popc(ballot));
  }
}

// ---- cp.async ----------------------------------------------------------------------------------

__global__ void async_then_read(const float* in, float* out, bool wait) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x;
  ptx::cp_async<16>(s + 4 * t, in + 4 * t);
  ptx::cp_async_commit();
  if (wait) ptx::cp_async_wait<0>();
  out[t] = s[4 * t];
}

__global__ void async_never_waited(const float* in, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  ptx::cp_async<16>(s + 4 * threadIdx.x, in + 4 * threadIdx.x);
  ptx::cp_async_commit();
  out[threadIdx.x] = 0.f;
}

// ---- launch configuration and block order -------------------------------------------------------

__global__ void record_order(int* counter, int* order) { order[blockIdx.x] = atomicAdd(counter, 1); }

__global__ void nothing(float*) {}

void check_block_order() {
  const int blocks = 8;
  const char* names[] = {"sequential", "reversed", "shuffled"};
  const cem::emu::BlockOrder orders[] = {cem::emu::BlockOrder::kSequential, cem::emu::BlockOrder::kReversed,
                                         cem::emu::BlockOrder::kShuffled};
  for (int k = 0; k < 3; ++k) {
    cem::emu::Config config;
    config.block_order = orders[k];
    config.seed = 7;
    cem::emu::set_config(config);
    int counter = 0;
    std::vector<int> order(blocks, -1);
    const cudaError_t err =
        launch_kernel("record_order", record_order, dim3(blocks), dim3(1), 0, 0, nullptr, &counter, order.data());
    bool ok = err == cudaSuccess;
    bool sorted = true, reversed = true;
    std::vector<bool> seen(blocks, false);
    for (int b = 0; b < blocks; ++b) {
      ok = ok && order[b] >= 0 && order[b] < blocks && !seen[order[b]];
      if (ok) seen[order[b]] = true;
      sorted = sorted && order[b] == b;
      reversed = reversed && order[b] == blocks - 1 - b;
    }
    ok = ok && (k == 0 ? sorted : (k == 1 ? reversed : !sorted && !reversed));
    std::printf("%s block order %s: blocks ran as", ok ? "PASS" : "FAIL", names[k]);
    for (int b = 0; b < blocks; ++b) std::printf(" %d", order[b]);
    std::printf("\n");
    failures += ok ? 0 : 1;
  }
  cem::emu::set_config(cem::emu::Config{});
}

int main() {
  std::vector<float> out(256, 0.f), in(1024, 1.f);  // malloc'd: 16-byte aligned
  float* o = out.data();

  expect("RAW race, no barrier", run(neighbour_read, 64, 256, o, false), "read-after-write (RAW)");
  expect("RAW race fixed by __syncthreads", run(neighbour_read, 64, 256, o, true), nullptr);
  expect("WAR race, no barrier", run(overwrite_after_read, 64, 256, o, false), "write-after-read (WAR)");
  expect("WAR race fixed by __syncthreads", run(overwrite_after_read, 64, 256, o, true), nullptr);
  expect("WAW race", run(same_word, 64, 256, o, false), "write-after-write (WAW)");
  expect("distinct words", run(same_word, 64, 256, o, true), nullptr);
  expect("lanes exchange without __syncwarp", run(lane_exchange, 32, 128, o, false), "read-after-write (RAW)");
  expect("lanes exchange after __syncwarp", run(lane_exchange, 32, 128, o, true), nullptr);
  expect("pairs ordered by a pair __syncwarp", run(pair_exchange, 32, 128, o, false), nullptr);
  expect("read outside the pair's __syncwarp", run(pair_exchange, 32, 128, o, true), "read-after-write (RAW)");
  expect("2-byte neighbours are not a race", run(half_words, 64, 128, o), nullptr);

  expect("shared read in bounds", run(shared_index, 64, 256, o, 63), nullptr);
  expect("shared read past the allocation", run(shared_index, 64, 256, o, 64), "outside the 256 bytes of dynamic shared memory");
  expect("shared read before the allocation", run(shared_index, 64, 256, o, -1), "outside the 256 bytes");
  expect("aligned 16-byte shared load", run(shared_vector, 32, 256, o, 32), nullptr);
  expect("misaligned 16-byte shared load", run(shared_vector, 32, 256, o, 8), "not 16-byte aligned");
  expect("aligned 16-byte global load", run(global_vector, 32, 0, in.data(), o, 0), nullptr);
  expect("misaligned 16-byte global load", run(global_vector, 32, 0, in.data(), o, 1), "misaligned vector access");

  expect("every thread reaches the barrier", run(early_exit_barrier, 64, 0, o, 0), nullptr);
  expect("threads exit before a barrier", run(early_exit_barrier, 64, 0, o, 16), "a barrier or warp operation that not every thread reaches");
  expect("threads at two different barriers", run(two_barriers, 64, 0, o), "different __syncthreads calls");
  expect("shuffle from a lane in the mask", run(shuffle_source, 32, 0, o, 3), nullptr);
  expect("shuffle from a lane outside the mask", run(shuffle_source, 32, 0, o, 20), "which is not in the mask");
  expect("lanes in different warp operations", run(mixed_collectives, 32, 0, o), "met in different warp operations");
  expect("full-warp reduction and ballot", run(warp_reduce, 32, 0, in.data(), o), nullptr);
  if (out[0] != 32.f || out[1] != 32.f) {
    std::printf("FAIL warp reduction result: %g, ballot count %g (expected 32, 32)\n", out[0], out[1]);
    ++failures;
  }

  expect("cp.async read after wait_group", run(async_then_read, 32, 512, in.data(), o, true), nullptr);
  expect("cp.async read before wait_group", run(async_then_read, 32, 512, in.data(), o, false), "cp.async destination in flight");
  expect("cp.async never waited for", run(async_never_waited, 32, 512, in.data(), o), "never waited for");

  expect("64 KiB of shared memory without opting in",
         launch_kernel("nothing", nothing, dim3(1), dim3(32), 0, 64 << 10, nullptr, o), "may use 49152");
  expect("opt-in beyond sm_80's 163 KiB", launch_kernel("nothing", nothing, dim3(1), dim3(32), 170000, 0, nullptr, o),
         "at most 166912");
  expect("2048 threads per block", launch_kernel("nothing", nothing, dim3(1), dim3(2048), 0, 0, nullptr, o),
         "not a valid launch configuration");
  check_block_order();

  std::printf("%s\n", failures == 0 ? "every checker case behaved" : "SOME CHECKER CASES MISBEHAVED");
  return failures == 0 ? 0 : 1;
}
