// The host side of the project's PTX wrappers (cuda/primitives.cuh): mma.sync m16n8k16,
// ldmatrix and cp.async. Register fragments follow the PTX ISA's documented layouts: the 32
// lanes meet, their fragments are gathered by those index formulas, the product (or the load) is
// done once, and the results go back to the lanes by the same formulas.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_fp16.h>

#include <cmath>

#include "runtime.h"

namespace cem::emu::ptx {

enum class MmaInput { kF16, kBF16 };

namespace layout {

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type":
// groupID = lane >> 2, threadID_in_group = lane % 4.
CEM_EMU_UNCHECKED inline int a_row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 1) & 1); }
CEM_EMU_UNCHECKED inline int a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + 8 * (i >= 4); }
CEM_EMU_UNCHECKED inline int b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + 8 * (i >= 2); }
CEM_EMU_UNCHECKED inline int b_col(int lane, int) { return lane >> 2; }
CEM_EMU_UNCHECKED inline int c_row(int lane, int i) { return (lane >> 2) + 8 * (i >= 2); }
CEM_EMU_UNCHECKED inline int c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

}  // namespace layout

CEM_EMU_UNCHECKED inline float half_bits_to_float(uint16_t bits, MmaInput input) {
  if (input == MmaInput::kBF16) {  // bf16 is the upper half of a float
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &word, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// Element i of a fragment: registers hold two 16-bit elements each, the lower index in the low half.
CEM_EMU_UNCHECKED inline uint16_t element(const uint32_t* regs, int i) {
  return static_cast<uint16_t>(regs[i / 2] >> (16 * (i % 2)));
}

struct MmaArgs {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

CEM_EMU_UNCHECKED inline void mma_m16n8k16_combine(void* const* lane_args, unsigned, const void* context) {
  const auto input = *static_cast<const MmaInput*>(context);
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* args = static_cast<const MmaArgs*>(lane_args[lane]);
    for (int i = 0; i < 8; ++i) a[layout::a_row(lane, i)][layout::a_col(lane, i)] = half_bits_to_float(element(args->a, i), input);
    for (int i = 0; i < 4; ++i) b[layout::b_row(lane, i)][layout::b_col(lane, i)] = half_bits_to_float(element(args->b, i), input);
    for (int i = 0; i < 4; ++i) c[layout::c_row(lane, i)][layout::c_col(lane, i)] = args->c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* args = static_cast<const MmaArgs*>(lane_args[lane]);
    for (int i = 0; i < 4; ++i) {
      const int r = layout::c_row(lane, i), col = layout::c_col(lane, i);
      float acc = c[r][col];
      for (int k = 0; k < 16; ++k) acc += a[r][k] * b[k][col];  // 16-bit products are exact in float
      args->d[i] = acc;
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d = a b + c (d may alias c).
CEM_EMU_UNCHECKED inline void mma_m16n8k16(Site site, MmaInput input, float d[4], const uint32_t a[4],
                                           const uint32_t b[2], const float c[4]) {
  MmaArgs args{d, a, b, c};
  detail::warp_collective(site, input == MmaInput::kBF16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16",
                          0xffffffffu, &args, &mma_m16n8k16_combine, &input);
}

struct LdmatrixArgs {
  uint32_t* regs;
  const void* row;
};
struct LdmatrixShape {
  int matrices;
  bool transpose;
};

// Lane 8 m + r gives the address of row r (16 bytes) of matrix m; lane l receives, per matrix,
// elements (l / 4, 2 (l % 4) + {0, 1}), or of the transposed matrix with .trans.
CEM_EMU_UNCHECKED inline void ldmatrix_combine(void* const* lane_args, unsigned, const void* context) {
  const auto shape = *static_cast<const LdmatrixShape*>(context);
  uint16_t m[4][8][8];
  for (int mat = 0; mat < shape.matrices; ++mat) {
    for (int r = 0; r < 8; ++r) {
      const int source = 8 * mat + r;
      const void* row = static_cast<const LdmatrixArgs*>(lane_args[source])->row;
      detail::check_access(row, 16, detail::Access::kRead, detail::Space::kShared, source);
      std::memcpy(m[mat][r], row, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* args = static_cast<const LdmatrixArgs*>(lane_args[lane]);
    const int g = lane / 4, pair = 2 * (lane % 4);
    for (int mat = 0; mat < shape.matrices; ++mat) {
      const uint16_t lo = shape.transpose ? m[mat][pair][g] : m[mat][g][pair];
      const uint16_t hi = shape.transpose ? m[mat][pair + 1][g] : m[mat][g][pair + 1];
      args->regs[mat] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
CEM_EMU_UNCHECKED inline void ldmatrix(Site site, int matrices, bool transpose, uint32_t* regs, const void* row) {
  LdmatrixArgs args{regs, row};
  const LdmatrixShape shape{matrices, transpose};
  detail::warp_collective(site, transpose ? "ldmatrix.trans" : "ldmatrix", 0xffffffffu, &args, &ldmatrix_combine,
                          &shape);
}

}  // namespace cem::emu::ptx
