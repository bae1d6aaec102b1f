// Tile primitives of the CPU attention core: a register-blocked matrix product, a vectorized
// exp, and row reductions. Torch-free and compiled once per instruction set: the including
// translation unit defines CEM_CPU_ISA (the namespace that keeps each build's symbols apart,
// so the linker never mixes code built for different instruction sets) and CEM_VEC_BYTES.
// Vectors are GCC/Clang vector extensions, so the same code becomes SSE2 or AVX2 + FMA.
#pragma once

#include "cpu/attention_core_deps.h"

namespace cem::cpu::CEM_CPU_ISA {

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(CEM_VEC_BYTES)));
  typedef int32_t int_type __attribute__((vector_size(CEM_VEC_BYTES)));
  static constexpr int kWidth = CEM_VEC_BYTES / sizeof(float);
};

template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(CEM_VEC_BYTES)));
  static constexpr int kWidth = CEM_VEC_BYTES / sizeof(double);
};

template <typename T>
using VecT = typename Vec<T>::type;

template <typename T>
inline VecT<T> vload(const T* p) {
  VecT<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, VecT<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
inline VecT<T> vbroadcast(T a) {
  return VecT<T>{} + a;
}

// exp for float lanes: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and the Cephes
// degree-6 polynomial (about 1 ulp). Inputs below -87.3 give 0, as masked scores need.
inline VecT<float> vexp(VecT<float> x) {
  using V = VecT<float>;
  using VI = typename Vec<float>::int_type;
  const V lo = vbroadcast(-87.3f), hi = vbroadcast(88.3f);
  const auto underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Round x log2(e) to the nearest integer with the 1.5 * 2^23 trick (no SSE4.1 needed).
  const V magic = vbroadcast(12582912.0f);
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vbroadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const V result = p * (V)bits;  // 2^n from the exponent bits
  return underflow ? V{} : result;
}

// Double lanes: the float64 path is for exactness, not speed.
inline VecT<double> vexp(VecT<double> x) {
  for (int i = 0; i < Vec<double>::kWidth; ++i) {
    x[i] = std::exp(x[i]);
  }
  return x;
}

// out[j] = exp(in[j] - shift) for j < n; a short tail goes through a padded vector so every
// lane uses the same exp.
template <typename T>
inline void exp_shifted(T* out, const T* in, int64_t n, T shift) {
  constexpr int W = Vec<T>::kWidth;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vstore(out + j, vexp(vload(in + j) - shift));
  }
  const int rest = static_cast<int>(n - j);  // 0 <= rest < W
  if (rest > 0) {
    T pad[W] = {};
    for (int t = 0; t < rest && t < W; ++t) pad[t] = in[j + t] - shift;
    const VecT<T> e = vexp(vload(pad));
    for (int t = 0; t < rest && t < W; ++t) out[j + t] = e[t];
  }
}

template <typename T>
inline T row_max(const T* in, int64_t n) {
  constexpr int W = Vec<T>::kWidth;
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= W) {
    VecT<T> m = vload(in);
    for (j = W; j + W <= n; j += W) {
      const VecT<T> v = vload(in + j);
      m = v > m ? v : m;
    }
    for (int i = 0; i < W; ++i) best = m[i] > best ? m[i] : best;
  }
  for (; j < n; ++j) best = in[j] > best ? in[j] : best;
  return best;
}

template <typename T>
inline T row_sum(const T* in, int64_t n) {
  constexpr int W = Vec<T>::kWidth;
  VecT<T> s{};
  int64_t j = 0;
  for (; j + W <= n; j += W) s += vload(in + j);
  T total = 0;
  for (int i = 0; i < W; ++i) total += s[i];
  for (; j < n; ++j) total += in[j];
  return total;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int W = Vec<T>::kWidth;
  VecT<T> s{};
  int64_t j = 0;
  for (; j + W <= n; j += W) s += vload(a + j) * vload(b + j);
  T total = 0;
  for (int i = 0; i < W; ++i) total += s[i];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// y[j] += alpha * x[j]; plain loops the compiler vectorizes.
template <typename T>
inline void axpy(T* y, T alpha, const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

template <typename T>
inline void scale_row(T* y, T alpha, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] *= alpha;
}

// Sums over K run in chunks of kSumChunk terms, each started from zero in registers and then
// added to C: one running sum over D = 4096 terms loses about 4x more to rounding, which the
// float32 contract (well under 1e-4) cannot afford where scores are large.
constexpr int64_t kSumChunk = 128;

// C[MR x NV*W] (+)= op(A) B over K, accumulators held in registers. op(A)(r, k) is
// A[r * lda + k], or A[k * lda + r] when kTransA (A stored K x M), which lets the key-side
// products dS^T Q read a score tile without transposing it.
template <typename T, int MR, int NV, bool kTransA>
inline void gemm_micro(
    int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::kWidth;
  int64_t k0 = 0;
  do {
    const int64_t k1 = std::min(K, k0 + kSumChunk);
    VecT<T> acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = VecT<T>{};
    for (int64_t k = k0; k < k1; ++k) {
      VecT<T> b[NV];
      for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
      for (int r = 0; r < MR; ++r) {
        const T a = kTransA ? A[k * lda + r] : A[r * lda + k];
        for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
      }
    }
    const bool add = accumulate || k0 > 0;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        T* c = C + r * ldc + v * W;
        vstore(c, add ? vload(c) + acc[r][v] : acc[r][v]);
      }
    k0 = k1;
  } while (k0 < K);
}

// The last M % MR rows, one micro-kernel of the exact height.
template <typename T, int MR, int NV, bool kTransA>
inline void gemm_tail(
    int rows, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_micro<T, MR, NV, kTransA>(K, A, lda, B, ldb, C, ldc, accumulate);
    } else {
      gemm_tail<T, MR - 1, NV, kTransA>(rows, K, A, lda, B, ldb, C, ldc, accumulate);
    }
  }
}

// Rows per micro-kernel: MR x 2 vector accumulators plus the B vectors must stay in registers
// (16 vector registers up to AVX2: 6 x 2; AVX-512 has 32: 12 x 2).
constexpr int kGemmRows = CEM_VEC_BYTES >= 64 ? 12 : 6;

template <typename T, int NV, bool kTransA>
inline void gemm_rows(
    int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = kGemmRows;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    gemm_micro<T, MR, NV, kTransA>(K, A + (kTransA ? m : m * lda), lda, B, ldb, C + m * ldc, ldc, accumulate);
  }
  gemm_tail<T, MR - 1, NV, kTransA>(static_cast<int>(M - m), K, A + (kTransA ? m : m * lda), lda, B, ldb,
                                    C + m * ldc, ldc, accumulate);
}

// C (M x N, row stride ldc) = or += op(A) (M x K) * B (K x N, row stride ldb).
template <typename T, bool kTransA = false>
inline void gemm(
    int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
    bool accumulate) {
  constexpr int W = Vec<T>::kWidth;
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W) gemm_rows<T, 2, kTransA>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  for (; n + W <= N; n += W) gemm_rows<T, 1, kTransA>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  for (; n < N; ++n) {  // columns left over from the vector width, summed in chunks as above
    for (int64_t m = 0; m < M; ++m) {
      T total = accumulate ? C[m * ldc + n] : T(0);
      for (int64_t k0 = 0; k0 < K; k0 += kSumChunk) {
        T sum = 0;
        for (int64_t k = k0; k < std::min(K, k0 + kSumChunk); ++k)
          sum += (kTransA ? A[k * lda + m] : A[m * lda + k]) * B[k * ldb + n];
        total += sum;
      }
      C[m * ldc + n] = total;
    }
  }
}

}  // namespace cem::cpu::CEM_CPU_ISA
