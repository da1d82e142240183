// mmkernels: the math the CPU attention kernels share (attention.cpp, cross_attention.cpp).
//
// * gemm_rm: row-major GEMM on the Fortran sgemm_/dgemm_ that torch's CPU library exports, with
//   an ATen fallback.
// * The softmax row loops (row_max, row_exp_sum, row_grad): float32 runs 8-lane GCC/Clang vectors
//   with a branch-free exp (vexp_neg) and is compiled for several x86-64 levels, picked at load
//   time; float64 runs plain loops. The vector type and helpers are here for the kernel files'
//   own row loops too.
//
// Header-only. The multiversioned loops and gemm_rm are `static` (internal linkage): each kernel
// file gets its own copy, compiled exactly as when the code lived in that file.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include <ATen/ATen.h>

// The Fortran BLAS entry points that torch's CPU library exports (MKL / OpenBLAS builds). They are
// declared weak: when the loaded torch does not export them the pointers are null and gemm_rm
// falls back to at::mm / addmm_ on views of the same memory (correct, more per-call overhead).
// at::native::cpublas::gemm would be the natural choice but is not exported by libtorch_cpu.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

// Hot loops are compiled for several x86-64 levels and picked at load time (GCC >= 11, Linux).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define CPU_MATH_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))
#else
#define CPU_MATH_MULTIVERSION
#endif

// CPU_MATH_VEC: GCC/Clang vector extensions are available (vf, vi, vu and the v* helpers).
#if defined(__GNUC__) || defined(__clang__)
#define CPU_MATH_VEC 1
#define CPU_MATH_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
// The vectors are only passed between always-inline helpers: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#else
#define CPU_MATH_VEC 0
#define CPU_MATH_INLINE inline
#endif

namespace mmkernels {
namespace cpu_math {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when environment variable `name` is set to something other than "" or "0".
inline bool env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] && e[0] != '0';
}

// ----------------------------------------------------------------------------- GEMM

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// Whether the loaded torch exports the BLAS routine for T.
template <typename T> inline bool blas_exported();
template <> inline bool blas_exported<float>() { return sgemm_ != nullptr; }
template <> inline bool blas_exported<double>() { return dgemm_ != nullptr; }

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C (beta 0 or 1); lda/ldb/ldc are
// the leading dimensions of the stored row-major matrices (op(A) = A^T: A is stored [K, M]).
// BLAS is column-major: C^T = op(B)^T op(A)^T, so the operands swap and the flags carry over.
// use_blas = false (a kernel family's MMKERNELS_*_NO_BLAS switch) forces the ATen fallback.
template <typename T>
static void gemm_rm(bool use_blas, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == T(0))
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  if (use_blas && blas_exported<T>() && lda <= INT32_MAX && ldb <= INT32_MAX && ldc <= INT32_MAX &&
      M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX) {
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    const char fa = tb ? 'T' : 'N', fb = ta ? 'T' : 'N';
    blas_gemm(&fa, &fb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) {
    c.copy_(at::mm(a, b).mul_(alpha));
  } else {
    c.addmm_(a, b, /*beta=*/1, /*alpha=*/alpha);
  }
}

// ----------------------------------------------------------------------------- float32 vectors

#if CPU_MATH_VEC
constexpr int VL = 8;  // lanes
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

CPU_MATH_INLINE vf vload(const float* p) {
  vf x;
  __builtin_memcpy(&x, p, sizeof(vf));
  return x;
}
CPU_MATH_INLINE void vstore(float* p, vf x) { __builtin_memcpy(p, &x, sizeof(vf)); }
CPU_MATH_INLINE vf vsplat(float a) { return vf{} + a; }

// exp(x) for x <= ~0 (the callers subtract a row max / lse): range reduction x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for exp(r), and 2^n built in the exponent bits. Inputs
// below -87 (including -inf, the masked entries) give exactly 0. Relative error ~2 ulp.
CPU_MATH_INLINE vf vexp_neg(vf x) {
  const vf lo = vsplat(-87.0f);
  const vi dead = x < lo;
  x = (x < lo) ? lo : x;
  // nn = round(x * log2e): truncation towards 0, then one step down where that overshot by > 1/2
  const vf t = x * 1.44269504088896341f;
  vf nn = __builtin_convertvector(__builtin_convertvector(t, vi), vf);
  nn = (nn - t > 0.5f) ? nn - 1.0f : nn;
  vf r = x - nn * 0.693359375f;
  r = r - nn * (-2.12194440e-4f);
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi e = (__builtin_convertvector(nn, vi) + 127) << 23;
  vf two_n;
  __builtin_memcpy(&two_n, &e, sizeof(vf));
  vf res = p * two_n;
  return dead ? vsplat(0.0f) : res;
}
#endif

// ----------------------------------------------------------------------------- softmax rows

// The scalar loops of the row functions, from index j to n: the float32 versions finish their
// vector loop's remainder with them, the float64 versions run them whole.
template <typename T>
CPU_MATH_INLINE T row_max_from(const T* s, int64_t j, int64_t n, T mx) {
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}
template <typename T>
CPU_MATH_INLINE T row_exp_sum_from(T* s, int64_t j, int64_t n, T shift, T sum) {
  for (; j < n; ++j) {
    const T p = std::exp(s[j] - shift);
    s[j] = p;
    sum += p;
  }
  return sum;
}
template <typename T>
CPU_MATH_INLINE void row_grad_from(T* p, T* ds, int64_t j, int64_t n, T lse, T di) {
  for (; j < n; ++j) {
    const T e = std::exp(p[j] - lse);
    p[j] = e;
    ds[j] = e * (ds[j] - di);
  }
}

// max(init, max_j s[j]) (the inputs have no NaN unless q/k do).
CPU_MATH_MULTIVERSION static float row_max(const float* s, int64_t n, float init) {
  int64_t j = 0;
  float mx = init;
#if CPU_MATH_VEC
  vf m = vsplat(init);
  for (; j + VL <= n; j += VL) {
    const vf x = vload(s + j);
    m = (x > m) ? x : m;
  }
  for (int l = 0; l < VL; ++l) mx = std::max(mx, m[l]);
#endif
  return row_max_from(s, j, n, mx);
}

// s[j] = exp(s[j] - shift) (shift finite); returns the sum.
CPU_MATH_MULTIVERSION static float row_exp_sum(float* s, int64_t n, float shift) {
  int64_t j = 0;
  float sum = 0.0f;
#if CPU_MATH_VEC
  vf acc = vsplat(0.0f);
  for (; j + VL <= n; j += VL) {
    const vf p = vexp_neg(vload(s + j) - shift);
    vstore(s + j, p);
    acc += p;
  }
  for (int l = 0; l < VL; ++l) sum += acc[l];
#endif
  return row_exp_sum_from(s, j, n, shift, sum);
}

// p[j] = exp(p[j] - lse); ds[j] = p[j] * (ds[j] - di).
CPU_MATH_MULTIVERSION static void row_grad(float* p, float* ds, int64_t n, float lse, float di) {
  int64_t j = 0;
#if CPU_MATH_VEC
  for (; j + VL <= n; j += VL) {
    const vf e = vexp_neg(vload(p + j) - lse);
    vstore(p + j, e);
    vstore(ds + j, e * (vload(ds + j) - di));
  }
#endif
  row_grad_from(p, ds, j, n, lse, di);
}

inline double row_max(const double* s, int64_t n, double init) { return row_max_from(s, 0, n, init); }
inline double row_exp_sum(double* s, int64_t n, double shift) {
  return row_exp_sum_from(s, 0, n, shift, 0.0);
}
inline void row_grad(double* p, double* ds, int64_t n, double lse, double di) {
  row_grad_from(p, ds, 0, n, lse, di);
}

}  // namespace cpu_math
}  // namespace mmkernels
