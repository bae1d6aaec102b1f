// The register layouts of the project's tensor-core and async-copy wrappers (csrc/cuda/
// primitives.cuh), checked against plain matrix products. Fragments are built here
// from the PTX ISA's index formulas, written out again on purpose rather than taken from the
// emulator: built for the emulated backend this proves the emulator follows the ISA; built with
// nvcc and run on a GPU it proves the hardware does the same.
//
//   emulated: tests/test_emulator.py compiles it with the host compiler (CEM_CUDA_EMULATION)
//   GPU:      nvcc -std=c++17 -arch=sm_80 -I csrc -o layouts tests/cuda/primitive_layouts.cu && ./layouts
//
// Usage: primitive_layouts [seed]. One line per check; exit status 1 if any check fails.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/primitives.cuh"

using cem::cuda::dynamic_smem;
using cem::cuda::launch_kernel;
namespace ptx = cem::cuda::ptx;

// ---------------------------------------------------------------------------------------------
// Device memory: on a GPU cudaMalloc'd copies; in emulation the host vectors themselves.

template <typename T>
struct Buffer {
  std::vector<T> host;
  T* device = nullptr;

  explicit Buffer(std::vector<T> values) : host(std::move(values)) {
#ifdef CEM_CUDA_EMULATION
    device = host.data();
#else
    cudaMalloc(&device, host.size() * sizeof(T));
    cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
#endif
  }
  const std::vector<T>& read() {
#ifndef CEM_CUDA_EMULATION
    cudaMemcpy(host.data(), device, host.size() * sizeof(T), cudaMemcpyDeviceToHost);
#endif
    return host;
  }
  ~Buffer() {
#ifndef CEM_CUDA_EMULATION
    cudaFree(device);
#endif
  }
};

int failures = 0;

std::string scientific(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", x);
  return buf;
}

void report(const std::string& name, bool ok, const std::string& detail) {
  std::printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.c_str());
  failures += ok ? 0 : 1;
}

bool launched(const std::string& name, cudaError_t err) {
#ifndef CEM_CUDA_EMULATION
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  const char* text = cudaGetErrorString(err);
#else
  const std::string full = cem::emu::last_launch_report();
  const char* text = full.c_str();
#endif
  if (err != cudaSuccess) report(name, false, std::string("launch failed: ") + text);
  return err == cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// 16-bit element helpers.

template <typename T>
__host__ __device__ uint16_t bits_of(T v) {
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

__device__ void set_element(uint32_t* regs, int i, uint16_t bits) {
  regs[i / 2] = (regs[i / 2] & ~(0xffffu << (16 * (i % 2)))) | (static_cast<uint32_t>(bits) << (16 * (i % 2)));
}

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
std::vector<T> random_matrix(std::mt19937& rng, int n) {
  std::normal_distribution<float> normal;
  std::vector<T> m(n);
  for (auto& x : m) {
    if constexpr (std::is_same_v<T, __half>) {
      x = __float2half_rn(normal(rng));
    } else {
      x = __float2bfloat16_rn(normal(rng));
    }
  }
  return m;
}

std::vector<float> random_floats(std::mt19937& rng, int n) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// max |d - (a b + c)| / max |a b + c| with a (m x k), b (k x n) row-major, products in double.
template <typename T>
double product_error(const std::vector<T>& a, const std::vector<T>& b, const std::vector<float>& c,
                     const std::vector<float>& d, int m, int n, int k) {
  double worst = 0, scale = 0;
  for (int r = 0; r < m; ++r) {
    for (int col = 0; col < n; ++col) {
      double ref = c[r * n + col];
      for (int j = 0; j < k; ++j) ref += double(to_float(a[r * k + j])) * double(to_float(b[j * n + col]));
      worst = std::fmax(worst, std::fabs(d[r * n + col] - ref));
      scale = std::fmax(scale, std::fabs(ref));
    }
  }
  return worst / scale;
}

constexpr double kProductTolerance = 1e-5;  // float32 accumulation of 16 exact products

// ---------------------------------------------------------------------------------------------
// mma.m16n8k16 with fragments loaded straight from global memory by the ISA's formulas.

template <typename T>
__global__ void mma_from_formulas_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  ptx::FragA fa{};
  ptx::FragB fb{};
  ptx::FragC fc, fd;
  for (int i = 0; i < 8; ++i) {
    const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
    const int col = i < 4 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
    set_element(fa.x, i, bits_of(a[row * 16 + col]));
  }
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
    set_element(fb.x, i, bits_of(b[row * 8 + g]));
  }
  for (int i = 0; i < 4; ++i) fc.x[i] = c[(i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)];
  ptx::mma_m16n8k16<T>(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[(i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)] = fd.x[i];
}

// The FlashAttention-2 pattern: A by ldmatrix.x4 and B (stored k-major) by ldmatrix.x2.trans.
template <typename T>
__global__ void mma_from_ldmatrix_kernel(const T* a, const T* b, const float* c, float* d) {
  T* sa = reinterpret_cast<T*>(dynamic_smem());
  T* sb = sa + 16 * 16;
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int e = lane; e < 16 * 16; e += 32) sa[e] = a[e];
  for (int e = lane; e < 16 * 8; e += 32) sb[e] = b[e];
  __syncwarp();
  ptx::FragA fa;
  ptx::FragB fb;
  ptx::FragC fc, fd;
  ptx::ldmatrix<4>(fa.x, sa + (lane % 16) * 16 + (lane / 16) * 8);
  ptx::ldmatrix<2, true>(fb.x, sb + (lane % 16) * 8);
  for (int i = 0; i < 4; ++i) fc.x[i] = c[(i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)];
  ptx::mma_m16n8k16<T>(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[(i < 2 ? g : g + 8) * 8 + t * 2 + (i & 1)] = fd.x[i];
}

template <typename T>
void check_mma(std::mt19937& rng, const char* type) {
  Buffer<T> a(random_matrix<T>(rng, 16 * 16)), b(random_matrix<T>(rng, 16 * 8));
  Buffer<float> c(random_floats(rng, 16 * 8)), d(std::vector<float>(16 * 8, NAN));
  const std::string formulas = std::string("mma.m16n8k16.") + type + " (fragments by formula)";
  if (launched(formulas, launch_kernel("mma_from_formulas", mma_from_formulas_kernel<T>, dim3(1), dim3(32), 0, 0,
                                       nullptr, a.device, b.device, c.device, d.device))) {
    const double err = product_error(a.host, b.host, c.host, d.read(), 16, 8, 16);
    report(formulas, err < kProductTolerance, "relative error " + scientific(err));
  }
  Buffer<float> d2(std::vector<float>(16 * 8, NAN));
  const std::string loaded = std::string("mma.m16n8k16.") + type + " (fragments by ldmatrix.x4, .x2.trans)";
  const int smem = (16 * 16 + 16 * 8) * 2;
  if (launched(loaded, launch_kernel("mma_from_ldmatrix", mma_from_ldmatrix_kernel<T>, dim3(1), dim3(32), smem, smem,
                                     nullptr, a.device, b.device, c.device, d2.device))) {
    const double err = product_error(a.host, b.host, c.host, d2.read(), 16, 8, 16);
    report(loaded, err < kProductTolerance, "relative error " + scientific(err));
  }
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: every lane's registers against the element the ISA names.

template <int kCount, bool kTranspose>
__global__ void ldmatrix_kernel(const uint16_t* m, uint32_t* out) {
  uint16_t* s = reinterpret_cast<uint16_t*>(dynamic_smem());
  const int lane = threadIdx.x;
  for (int e = lane; e < kCount * 64; e += 32) s[e] = m[e];
  __syncwarp();
  uint32_t regs[kCount];
  ptx::ldmatrix<kCount, kTranspose>(regs, s + ((lane / 8) % kCount) * 64 + (lane % 8) * 8);
  for (int k = 0; k < kCount; ++k) out[lane * kCount + k] = regs[k];
}

template <int kCount, bool kTranspose>
void check_ldmatrix(std::mt19937& rng) {
  std::vector<uint16_t> values(kCount * 64);
  for (auto& v : values) v = static_cast<uint16_t>(rng());
  Buffer<uint16_t> m(values);
  Buffer<uint32_t> out(std::vector<uint32_t>(32 * kCount, 0));
  const std::string name = "ldmatrix.x" + std::to_string(kCount) + (kTranspose ? ".trans" : "");
  if (!launched(name, launch_kernel("ldmatrix", ldmatrix_kernel<kCount, kTranspose>, dim3(1), dim3(32), kCount * 128,
                                    kCount * 128, nullptr, m.device, out.device))) {
    return;
  }
  const auto& got = out.read();
  int wrong = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int k = 0; k < kCount; ++k) {
      const uint16_t* mat = values.data() + k * 64;
      const uint32_t lo = kTranspose ? mat[col * 8 + row] : mat[row * 8 + col];
      const uint32_t hi = kTranspose ? mat[(col + 1) * 8 + row] : mat[row * 8 + col + 1];
      wrong += got[lane * kCount + k] != (lo | hi << 16);
    }
  }
  report(name, wrong == 0, std::to_string(wrong) + " of " + std::to_string(32 * kCount) + " registers differ");
}

// ---------------------------------------------------------------------------------------------
// cp.async: two commit groups, the second waited for later, and a zero-filled ragged chunk.

// The last thread's second chunk reads only this many bytes; the rest must arrive as zeros.
template <int kBytes>
constexpr int kRaggedBytes = kBytes == 4 ? 0 : kBytes / 2;

template <int kBytes>
__global__ void cp_async_kernel(const float* src, float* dst) {
  constexpr int kFloats = kBytes / 4;
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x, n = blockDim.x;
  ptx::cp_async<kBytes>(s + kFloats * t, src + kFloats * t);
  ptx::cp_async_commit();
  const int second = n + t;
  ptx::cp_async<kBytes>(s + kFloats * second, src + kFloats * second, t == n - 1 ? kRaggedBytes<kBytes> : kBytes);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();  // the first group has landed
  __syncthreads();
  const int neighbour = (t + 1) % n;  // another thread's chunk: visible after the barrier
  for (int i = 0; i < kFloats; ++i) dst[kFloats * neighbour + i] = s[kFloats * neighbour + i];
  ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < kFloats; ++i) dst[kFloats * (n + neighbour) + i] = s[kFloats * (n + neighbour) + i];
}

template <int kBytes>
void check_cp_async(std::mt19937& rng) {
  constexpr int kThreads = 64, kFloats = kBytes / 4;
  Buffer<float> src(random_floats(rng, 2 * kThreads * kFloats)), dst(std::vector<float>(2 * kThreads * kFloats, NAN));
  const std::string name = "cp.async " + std::to_string(kBytes) + " bytes, two groups, zero fill";
  const int smem = 2 * kThreads * kBytes;
  if (!launched(name, launch_kernel("cp_async", cp_async_kernel<kBytes>, dim3(1), dim3(kThreads), smem, smem, nullptr,
                                    src.device, dst.device))) {
    return;
  }
  const auto& got = dst.read();
  int wrong = 0;
  for (int i = 0; i < 2 * kThreads * kFloats; ++i) {
    const bool zero_filled = i >= 2 * kThreads * kFloats - (kBytes - kRaggedBytes<kBytes>) / 4;
    const float want = zero_filled ? 0.f : src.host[i];
    wrong += std::memcmp(&got[i], &want, 4) != 0;
  }
  report(name, wrong == 0, std::to_string(wrong) + " of " + std::to_string(2 * kThreads * kFloats) + " values differ");
}

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? static_cast<unsigned>(std::strtoul(argv[1], nullptr, 10)) : 1u;
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  check_mma<__half>(rng, "f16");
  check_mma<__nv_bfloat16>(rng, "bf16");
  check_ldmatrix<1, false>(rng);
  check_ldmatrix<2, false>(rng);
  check_ldmatrix<4, false>(rng);
  check_ldmatrix<1, true>(rng);
  check_ldmatrix<2, true>(rng);
  check_ldmatrix<4, true>(rng);
  check_cp_async<4>(rng);
  check_cp_async<8>(rng);
  check_cp_async<16>(rng);
  std::printf("%s\n", failures == 0 ? "all layout checks passed" : "SOME LAYOUT CHECKS FAILED");
  return failures == 0 ? 0 : 1;
}
