// The project's wrappers of the warp-level tensor-core and asynchronous-copy instructions. On a
// GPU each is one inline PTX instruction; in the emulated backend (CEM_CUDA_EMULATION) it is the
// warp-collective emulation of cuda/emulation/ptx.h, which gathers and scatters fragments by the
// PTX ISA's documented layouts. tests/cuda/primitive_layouts.cu checks both against plain
// matrix products with fragments built from those formulas.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/device_runtime.cuh"

namespace cem::cuda::ptx {

// Fragments of mma.m16n8k16.row.col, groupID g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"):
//   A (16 x 16), element i < 8: row g + 8 ((i / 2) % 2), column 2 t + i % 2 + 8 (i / 4)
//   B (16 x 8),  element i < 4: row 2 t + i % 2 + 8 (i / 2), column g
//   C, D (16 x 8, float32), element i < 4: row g + 8 (i / 2), column 2 t + i % 2
// Two 16-bit elements share a register, the lower index in the low half.
struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  float x[4];
};

#ifdef CEM_CUDA_EMULATION
#define CEM_PTX_CALLER , ::cem::emu::Site site = ::cem::emu::Site{__builtin_FILE(), __builtin_LINE()}
#else
#define CEM_PTX_CALLER
#endif

// d = a b + c; T is __half or __nv_bfloat16; d may be c.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(FragC& d, const FragA& a, const FragB& b, const FragC& c CEM_PTX_CALLER) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma.m16n8k16 takes f16 or bf16");
#ifdef CEM_CUDA_EMULATION
  ::cem::emu::ptx::mma_m16n8k16(site, std::is_same_v<T, __half> ? ::cem::emu::ptx::MmaInput::kF16 : ::cem::emu::ptx::MmaInput::kBF16,
                                d.x, a.x, b.x, c.x);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]), "f"(c.x[1]),
          "f"(c.x[2]), "f"(c.x[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]), "f"(c.x[1]),
          "f"(c.x[2]), "f"(c.x[3]));
  }
#endif
}

#ifndef CEM_CUDA_EMULATION
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix.sync.aligned.m8n8.x{kCount}[.trans].shared.b16: lane 8 m + r passes the address of row
// r (16 bytes, 16-byte aligned) of 8 x 8 matrix m; regs[m] of lane l then holds row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m (with .trans: of its transpose).
template <int kCount, bool kTranspose = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&regs)[kCount], const void* row CEM_PTX_CALLER) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef CEM_CUDA_EMULATION
  ::cem::emu::ptx::ldmatrix(site, kCount, kTranspose, regs, row);
#else
  const uint32_t address = shared_address(row);
  if constexpr (kCount == 1 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(regs[0]) : "r"(address) : "memory");
  } else if constexpr (kCount == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(regs[0]) : "r"(address) : "memory");
  } else if constexpr (kCount == 2 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1]) : "r"(address) : "memory");
  } else if constexpr (kCount == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1]) : "r"(address) : "memory");
  } else if constexpr (!kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3]) : "r"(address) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3]) : "r"(address) : "memory");
  }
#endif
}

// cp.async of kBytes (4, 8 or 16) from global to shared memory, both kBytes-aligned; only the
// first src_bytes are read and the rest of the destination is zero-filled (ragged edges).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* shared_dst, const void* global_src, int src_bytes = kBytes CEM_PTX_CALLER) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef CEM_CUDA_EMULATION
  ::cem::emu::detail::async_copy(site, shared_dst, global_src, kBytes, src_bytes);
#else
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(shared_address(shared_dst)), "l"(global_src), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :: "r"(shared_address(shared_dst)), "l"(global_src), "n"(kBytes), "r"(src_bytes) : "memory");
  }
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef CEM_CUDA_EMULATION
  ::cem::emu::detail::async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight. Other
// threads see the data only after a barrier.
#ifdef CEM_CUDA_EMULATION
template <int kPending>
inline void cp_async_wait(::cem::emu::Site site = ::cem::emu::Site{__builtin_FILE(), __builtin_LINE()}) {
  ::cem::emu::detail::async_wait(site, kPending);
}
#else
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif

#undef CEM_PTX_CALLER

}  // namespace cem::cuda::ptx
