// nvcuda::wmma for the host compiler, 16 x 16 x 16 tiles. The hardware's fragment layout is
// undocumented, and kernels may not read fragment elements, so any layout is faithful: here lane
// l holds element e = 32 s + l (s < 8) of the row-major tile. Loads and stores are warp-wide
// (every lane must pass the same pointer and leading dimension) and each lane then touches its
// own elements; mma_sync gathers the warp's fragments, multiplies once and scatters the result.
#pragma once

#include <cstdint>
#include <type_traits>

#include "runtime.h"

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, typename T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the CUDA emulation supports 16x16x16 WMMA tiles only");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

namespace emulation {

constexpr int kTile = 16;

// Element (r, c) of the 16 x 16 tile held by `lane` in slot s.
CEM_EMU_UNCHECKED inline int element_row(int lane, int s) { return (32 * s + lane) / kTile; }
CEM_EMU_UNCHECKED inline int element_col(int lane, int s) { return (32 * s + lane) % kTile; }

template <typename T>
CEM_EMU_UNCHECKED inline float element_value(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

struct MemoryOp {
  const void* pointer;
  unsigned ldm;
};

// Every lane of the warp must name the same tile; the pointer must be 256-bit aligned and the
// leading dimension a multiple of 16 bytes (the WMMA rules).
CEM_EMU_UNCHECKED inline void check_same_tile(void* const* lane_args, unsigned mask, const void* context) {
  const auto* what = static_cast<const char*>(context);
  const MemoryOp* first = nullptr;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const auto* op = static_cast<const MemoryOp*>(lane_args[lane]);
    if (first == nullptr) {
      first = op;
    } else if (op->pointer != first->pointer || op->ldm != first->ldm) {
      ::cem::emu::detail::warp_collective_error(what, "lanes of the warp passed different pointers or leading dimensions");
    }
  }
}

template <typename T>
CEM_EMU_UNCHECKED inline void rendezvous(::cem::emu::Site site, const char* what, const T* pointer, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) {
    ::cem::emu::detail::warp_collective_error(what, "the pointer is not 256-bit (32-byte) aligned");
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    ::cem::emu::detail::warp_collective_error(what, "the leading dimension is not a multiple of 16 bytes");
  }
  MemoryOp op{pointer, ldm};
  ::cem::emu::detail::warp_collective(site, what, 0xffffffffu, &op, &check_same_tile, what);
}

template <typename T>
CEM_EMU_UNCHECKED inline int offset(int r, int c, unsigned ldm, bool row_major) {
  return row_major ? r * static_cast<int>(ldm) + c : c * static_cast<int>(ldm) + r;
}

template <class Frag, typename T>
CEM_EMU_UNCHECKED inline void load(::cem::emu::Site site, Frag& f, const T* p, unsigned ldm, bool row_major) {
  rendezvous(site, "wmma::load_matrix_sync", p, ldm);
  const int lane = ::cem::emu::detail::lane_id();
  for (int s = 0; s < Frag::num_elements; ++s) {
    const T* element = p + offset<T>(element_row(lane, s), element_col(lane, s), ldm, row_major);
    ::cem::emu::detail::check_access(element, sizeof(T), ::cem::emu::detail::Access::kRead);
    f.x[s] = *element;
  }
}

struct MmaArgs {
  float* d;
  const void* a;
  const void* b;
  const float* c;
};

// D = A B + C for the whole warp, accumulated in float in k order. load() resolved the storage
// order, so slot s of every fragment holds logical element (element_row, element_col).
template <typename TA>
CEM_EMU_UNCHECKED inline void multiply(void* const* lane_args, unsigned, const void*) {
  float a[kTile][kTile], b[kTile][kTile], c[kTile][kTile];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* args = static_cast<const MmaArgs*>(lane_args[lane]);
    for (int s = 0; s < 8; ++s) {
      const int r = element_row(lane, s), col = element_col(lane, s);
      a[r][col] = emulation::element_value(static_cast<const TA*>(args->a)[s]);
      b[r][col] = emulation::element_value(static_cast<const TA*>(args->b)[s]);
      c[r][col] = args->c[s];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* args = static_cast<const MmaArgs*>(lane_args[lane]);
    for (int s = 0; s < 8; ++s) {
      const int r = element_row(lane, s), col = element_col(lane, s);
      float acc = c[r][col];
      for (int k = 0; k < kTile; ++k) {
        acc += a[r][k] * b[k][col];  // 16-bit products are exact in float: this is fma
      }
      args->d[s] = acc;
    }
  }
}

}  // namespace emulation

template <class Use, typename T, class Layout>
CEM_EMU_UNCHECKED inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& value) {
  for (auto& x : f.x) x = value;
}

#define load_matrix_sync(...) load_matrix_sync_at(CEM_EMU_SITE, __VA_ARGS__)
#define store_matrix_sync(...) store_matrix_sync_at(CEM_EMU_SITE, __VA_ARGS__)
#define mma_sync(...) mma_sync_at(CEM_EMU_SITE, __VA_ARGS__)

template <class Use, typename T, class Layout>
CEM_EMU_UNCHECKED inline void load_matrix_sync_at(::cem::emu::Site site, fragment<Use, 16, 16, 16, T, Layout>& f,
                                                  const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  emulation::load(site, f, p, ldm, std::is_same_v<Layout, row_major>);
}

CEM_EMU_UNCHECKED inline void load_matrix_sync_at(::cem::emu::Site site, fragment<accumulator, 16, 16, 16, float>& f,
                                                  const float* p, unsigned ldm, layout_t layout) {
  emulation::load(site, f, p, ldm, layout == mem_row_major);
}

CEM_EMU_UNCHECKED inline void store_matrix_sync_at(::cem::emu::Site site, float* p,
                                                   const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                                                   layout_t layout) {
  emulation::rendezvous(site, "wmma::store_matrix_sync", p, ldm);
  const int lane = ::cem::emu::detail::lane_id();
  for (int s = 0; s < 8; ++s) {
    float* element = p + emulation::offset<float>(emulation::element_row(lane, s), emulation::element_col(lane, s),
                                                  ldm, layout == mem_row_major);
    ::cem::emu::detail::check_access(element, sizeof(float), ::cem::emu::detail::Access::kWrite);
    *element = f.x[s];
  }
}

template <typename T, class LA, class LB>
CEM_EMU_UNCHECKED inline void mma_sync_at(::cem::emu::Site site, fragment<accumulator, 16, 16, 16, float>& d,
                                          const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                                          const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                                          const fragment<accumulator, 16, 16, 16, float>& c) {
  emulation::MmaArgs args{d.x, a.x, b.x, c.x};
  ::cem::emu::detail::warp_collective(site, "wmma::mma_sync", 0xffffffffu, &args,
                                      &emulation::multiply<T>, nullptr);
}

}  // namespace nvcuda::wmma
