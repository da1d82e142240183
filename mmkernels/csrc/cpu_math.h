// mmkernels: the math the CPU kernels share (attention, cross-attention, contrastive, experts).
//
// * gemm_rm: row-major GEMM on the Fortran sgemm_/dgemm_ that torch's CPU library exports, with
//   an ATen fallback.
// * The vector layer: GCC/Clang vectors of 8 (vf) and 16 (wf) float lanes, their helpers and
//   one branch-free exp (vexp), for the kernel files' own hot loops; CPU_MATH_MULTIVERSION
//   compiles such a loop for several x86-64 levels, picked at load time.
// * The softmax row loops (row_max, row_exp_sum, row_grad, row_grad_norm): float32 on vf,
//   float64 plain.
//
// Header-only. The multiversioned loops and gemm_rm are `static` (internal linkage): each kernel
// file gets its own copy, compiled exactly as when the code lived in that file.

#pragma once

#include <algorithm>
#include <atomic>
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

// Whether gemm_rm may call BLAS: off, it takes its ATen fallback (the path of a torch that exports
// no sgemm_/dgemm_), which tests switch on through mmkernels._C.set_cpu_blas. A static of an
// inline function: one switch for every kernel file.
inline std::atomic<bool>& blas_switch() {
  static std::atomic<bool> enabled{true};
  return enabled;
}
// Turn BLAS in gemm_rm on or off; returns the previous setting.
inline bool set_blas_enabled(bool enabled) { return blas_switch().exchange(enabled); }

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C (beta 0 or 1); lda/ldb/ldc are
// the leading dimensions of the stored row-major matrices (op(A) = A^T: A is stored [K, M]).
// BLAS is column-major: C^T = op(B)^T op(A)^T, so the operands swap and the flags carry over.
// With the BLAS switch off (set_blas_enabled) it always takes the ATen fallback.
template <typename T>
static void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == T(0))
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  if (blas_switch().load(std::memory_order_relaxed) && blas_exported<T>() && lda <= INT32_MAX &&
      ldb <= INT32_MAX && ldc <= INT32_MAX &&
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
// Two widths: vf (8 lanes), the softmax row loops' vector, and wf (16 lanes), the contrastive
// loops' vector (one AVX-512 register where the multiversioned clone has them, two or four
// narrower ones elsewhere). The helpers below take either; where the type cannot be deduced
// it defaults to vf.
constexpr int VL = 8;
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));
constexpr int WL = 16;
typedef float wf __attribute__((vector_size(WL * sizeof(float))));
typedef int32_t wi __attribute__((vector_size(WL * sizeof(int32_t))));
typedef uint32_t wu __attribute__((vector_size(WL * sizeof(uint32_t))));

// The int32 / uint32 vectors and the lane count that go with a float vector type.
template <class V> struct vec_traits;
template <> struct vec_traits<vf> {
  typedef vi I;
  typedef vu U;
  static constexpr int lanes = VL;
};
template <> struct vec_traits<wf> {
  typedef wi I;
  typedef wu U;
  static constexpr int lanes = WL;
};

// The same bits as another type of the same size.
template <class To, class From>
CPU_MATH_INLINE To vbits(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "vbits: the sizes differ");
  To y;
  __builtin_memcpy(&y, &x, sizeof(To));
  return y;
}
template <class V = vf>
CPU_MATH_INLINE V vload(const float* p) {
  V x;
  __builtin_memcpy(&x, p, sizeof(V));
  return x;
}
template <class V>
CPU_MATH_INLINE void vstore(float* p, V x) { __builtin_memcpy(p, &x, sizeof(V)); }
template <class V = vf>
CPU_MATH_INLINE V vsplat(float a) { return V{} + a; }
// m ? a : b lane by lane (m: a comparison's all-ones / zero lanes).
template <class Mask, class V>
CPU_MATH_INLINE V vsel(const Mask& m, const V& a, const V& b) { return m ? a : b; }
// Lanes below n (0 <= n <= lanes) as a mask.
template <class V>
CPU_MATH_INLINE typename vec_traits<V>::I vlanes_below(int64_t n) {
  typedef typename vec_traits<V>::I I;
  I idx;
  for (int i = 0; i < vec_traits<V>::lanes; ++i) idx[i] = i;
  return idx < (I{} + static_cast<int32_t>(n));
}
// Loads / stores of the first n (< lanes) lanes; the other lanes read as `fill`.
template <class V>
CPU_MATH_INLINE V vload_n(const float* p, int64_t n, float fill) {
  float t[vec_traits<V>::lanes];
  for (int i = 0; i < vec_traits<V>::lanes; ++i) t[i] = i < n ? p[i] : fill;
  return vload<V>(t);
}
template <class V>
CPU_MATH_INLINE void vstore_n(float* p, const V& v, int64_t n) {
  float t[vec_traits<V>::lanes];
  vstore(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
// NaN-propagating max, lane by lane and across the lanes.
template <class V>
CPU_MATH_INLINE V vmax_nan(const V& a, const V& b) { return vsel((a > b) | (a != a), a, b); }
template <class V>
CPU_MATH_INLINE float vhmax_nan(const V& v) {
  float m = v[0];
  for (int i = 1; i < vec_traits<V>::lanes; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}
// The sum of the lanes, in double.
template <class V>
CPU_MATH_INLINE double vhsum(const V& v) {
  double s = 0.0;
  for (int i = 0; i < vec_traits<V>::lanes; ++i) s += static_cast<double>(v[i]);
  return s;
}

// Exact products of wf lanes summed in double (for sums that cancel, such as sum(G * S)).
typedef float wf_half __attribute__((vector_size(WL / 2 * sizeof(float))));
typedef double wd_half __attribute__((vector_size(WL / 2 * sizeof(double))));
struct DoubleAcc {
  wd_half lo = {}, hi = {};
};
CPU_MATH_INLINE void add_products(DoubleAcc& acc, const wf& a, const wf& b) {
  wf_half a0, a1, b0, b1;
  __builtin_memcpy(&a0, &a, sizeof(a0));
  __builtin_memcpy(&a1, reinterpret_cast<const char*>(&a) + sizeof(a0), sizeof(a1));
  __builtin_memcpy(&b0, &b, sizeof(b0));
  __builtin_memcpy(&b1, reinterpret_cast<const char*>(&b) + sizeof(b0), sizeof(b1));
  acc.lo += __builtin_convertvector(a0, wd_half) * __builtin_convertvector(b0, wd_half);
  acc.hi += __builtin_convertvector(a1, wd_half) * __builtin_convertvector(b1, wd_half);
}
CPU_MATH_INLINE double total(const DoubleAcc& acc) {
  double s = 0.0;
  for (int i = 0; i < WL / 2; ++i) s += acc.lo[i];
  for (int i = 0; i < WL / 2; ++i) s += acc.hi[i];
  return s;
}

// exp(x) without branches, for every x: range reduction x = n ln2 + r with |r| <= ln2/2, a
// degree-6 polynomial for exp(r), and 2^n built in the exponent bits. Max relative error
// ~1.4 ulp over the normal range; exp(-inf) = 0 (the masked entries), exp(+inf) = inf,
// exp(x > 88.72) = inf, gradual underflow below FLT_MIN, NaN -> NaN.
template <class V>
CPU_MATH_INLINE V vexp(V x) {
  typedef typename vec_traits<V>::I I;
  typedef typename vec_traits<V>::U U;
  // Clamp x to [-104, 88.8] on its bit pattern (integer compares: no NaN semantics): as uint32
  // every float <= -104 (and -inf, -NaN) is above bits(-104); as int32 every float >= 88.8 (and
  // +inf, +NaN) is above bits(88.8). NaN is restored at the end.
  const U lo = U{} + 0xC2D00000u;  // -104.0f
  const I hi = I{} + 0x42B1999A;   // 88.8f
  U u = vbits<U>(x);
  u = vsel(u > lo, lo, u);
  I c = vbits<I>(u);
  c = vsel(c > hi, hi, c);
  const V xc = vbits<V>(c);
  // n = round(x / ln 2) with the 1.5 * 2^23 trick: n sits in the low mantissa bits of t.
  const V magic = vsplat<V>(12582912.0f);
  const V t = xc * 1.44269504088896341f + magic;
  const V n = t - magic;
  const I ni = vbits<I>(t) - 0x4B400000;  // in [-150, 128]
  // r = x - n ln2 (Cody-Waite, two parts); exp(r) = 1 + r + r^2 P(r).
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vsplat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V y = p * (r * r) + r + 1.0f;
  // y * 2^n as y * 2^n1 * 2^(n - n1): both factors are normal floats for n in [-150, 128], so
  // overflow to inf and gradual underflow come out of the multiplications.
  const I n1 = ni >> 1;
  y = y * vbits<V>(vbits<U>(n1 + 127) << 23) * vbits<V>(vbits<U>(ni - n1 + 127) << 23);
  return vsel(x != x, x, y);
}

// exp(x) for the softmax loops, whose x <= ~0 (a row max or lse subtracted).
CPU_MATH_INLINE vf vexp_neg(vf x) { return vexp(x); }
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

template <typename T>
CPU_MATH_INLINE void row_grad_norm_from(T* p, T* ds, int64_t j, int64_t n, T mx, T inv_l, T di) {
  for (; j < n; ++j) {
    const T e = std::exp(p[j] - mx) * inv_l;
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

// p[j] = exp(p[j] - mx) * inv_l; ds[j] = p[j] * (ds[j] - di). The row max and the inverse row sum
// are kept apart (not one rounded lse = mx + log(l)): at large scores ulp(lse) would become a
// relative error of every p.
CPU_MATH_MULTIVERSION static void row_grad_norm(float* p, float* ds, int64_t n, float mx, float inv_l,
                                                float di) {
  int64_t j = 0;
#if CPU_MATH_VEC
  for (; j + VL <= n; j += VL) {
    const vf e = vexp_neg(vload(p + j) - mx) * inv_l;
    vstore(p + j, e);
    vstore(ds + j, e * (vload(ds + j) - di));
  }
#endif
  row_grad_norm_from(p, ds, j, n, mx, inv_l, di);
}

inline double row_max(const double* s, int64_t n, double init) { return row_max_from(s, 0, n, init); }
inline double row_exp_sum(double* s, int64_t n, double shift) {
  return row_exp_sum_from(s, 0, n, shift, 0.0);
}
inline void row_grad(double* p, double* ds, int64_t n, double lse, double di) {
  row_grad_from(p, ds, 0, n, lse, di);
}
inline void row_grad_norm(double* p, double* ds, int64_t n, double mx, double inv_l, double di) {
  row_grad_norm_from(p, ds, 0, n, mx, inv_l, di);
}

}  // namespace cpu_math
}  // namespace mmkernels
