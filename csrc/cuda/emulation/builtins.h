// What CUDA device code takes for granted, for the host compiler: qualifiers, the built-in
// variables, barriers, warp shuffles and votes, atomics and the device math functions the
// kernels use. Every synchronisation point names its source line, so reports can point at it.
#pragma once

#include <cuda_bf16.h>  // CUDA's own bf16/fp16 types and conversions work on the host
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "runtime.h"

// crt/host_defines.h (pulled in above) makes __global__, __device__ and __host__ empty for a
// host compiler. Static __shared__ variables have no per-block storage here: kernels use the
// dynamic shared memory of their launch (cem::cuda::dynamic_smem()), which the checker watches.
#undef __shared__
#define __shared__ static_assert(false, "the CUDA emulation supports dynamic shared memory only");
#define __launch_bounds__(...)

#define threadIdx (::cem::emu::detail::thread_idx())
#define blockIdx (::cem::emu::detail::block_idx())
#define blockDim (::cem::emu::detail::block_dim())
#define gridDim (::cem::emu::detail::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::cem::emu::detail::syncthreads(CEM_EMU_SITE)
#define __syncwarp(...) ::cem::emu::syncwarp_at(CEM_EMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cem::emu::shuffle_at(CEM_EMU_SITE, ::cem::emu::detail::ShuffleKind::kIdx, __VA_ARGS__)
#define __shfl_up_sync(...) ::cem::emu::shuffle_at(CEM_EMU_SITE, ::cem::emu::detail::ShuffleKind::kUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::cem::emu::shuffle_at(CEM_EMU_SITE, ::cem::emu::detail::ShuffleKind::kDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cem::emu::shuffle_at(CEM_EMU_SITE, ::cem::emu::detail::ShuffleKind::kXor, __VA_ARGS__)
#define __ballot_sync(mask, p) ::cem::emu::detail::vote(CEM_EMU_SITE, ::cem::emu::detail::VoteKind::kBallot, mask, p)
#define __any_sync(mask, p) (::cem::emu::detail::vote(CEM_EMU_SITE, ::cem::emu::detail::VoteKind::kAny, mask, p) != 0)
#define __all_sync(mask, p) (::cem::emu::detail::vote(CEM_EMU_SITE, ::cem::emu::detail::VoteKind::kAll, mask, p) != 0)

namespace cem::emu {

CEM_EMU_UNCHECKED inline void syncwarp_at(Site site, unsigned mask = 0xffffffffu) { detail::syncwarp(site, mask); }

template <typename T>
CEM_EMU_UNCHECKED inline T shuffle_at(Site site, detail::ShuffleKind kind, unsigned mask, T value, int arg,
                                      int width = warpSize) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = detail::shuffle(site, kind, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Atomics are real host atomics: blocks of one launch may run on several host threads.
template <typename T, typename Op>
CEM_EMU_UNCHECKED inline T atomic_update(T* address, Op op) {
  detail::check_access(address, sizeof(T), detail::Access::kAtomic);
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = op(old);
  } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}

}  // namespace cem::emu

#define CEM_EMU_ATOMIC(name, T, expr)                                                          \
  CEM_EMU_UNCHECKED inline T name(T* address, T value) {                                       \
    return ::cem::emu::atomic_update(address, [value](T old) -> T { return expr; });           \
  }
CEM_EMU_ATOMIC(atomicAdd, int, old + value)
CEM_EMU_ATOMIC(atomicAdd, unsigned, old + value)
CEM_EMU_ATOMIC(atomicAdd, unsigned long long, old + value)
CEM_EMU_ATOMIC(atomicAdd, float, old + value)
CEM_EMU_ATOMIC(atomicAdd, double, old + value)
CEM_EMU_ATOMIC(atomicSub, int, old - value)
CEM_EMU_ATOMIC(atomicSub, unsigned, old - value)
CEM_EMU_ATOMIC(atomicMax, int, old > value ? old : value)
CEM_EMU_ATOMIC(atomicMax, unsigned, old > value ? old : value)
CEM_EMU_ATOMIC(atomicMin, int, old < value ? old : value)
CEM_EMU_ATOMIC(atomicMin, unsigned, old < value ? old : value)
CEM_EMU_ATOMIC(atomicExch, int, value)
CEM_EMU_ATOMIC(atomicExch, unsigned, value)
CEM_EMU_ATOMIC(atomicExch, float, value)
#undef CEM_EMU_ATOMIC

CEM_EMU_UNCHECKED inline int atomicCAS(int* address, int compare, int value) {
  return ::cem::emu::atomic_update(address, [=](int old) { return old == compare ? value : old; });
}
CEM_EMU_UNCHECKED inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) {
  return ::cem::emu::atomic_update(address, [=](unsigned old) { return old == compare ? value : old; });
}

// One host thread runs a block at a time and blocks share no shared memory: fences are no-ops.
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __ldg(const T* address) {
  return *address;  // instrumented like any load
}

// Integer and floating min/max overloads of the CUDA math API.
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }

// Fast-math intrinsics run at full precision here (the device's are within a few ulp).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
