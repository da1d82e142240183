// mmkernels: blockwise contrastive statistics and gradients on the CPU.
//
// The logits L = scale * q @ k^T are never materialised: rows are processed in
// chunks of R rows (R * M <= BUDGET floats), S = q_rows @ k^T goes through BLAS
// into one reused R x M float32 buffer, and fused, vectorised loops turn each
// chunk into row statistics and into running (online log-sum-exp) column
// statistics. The backward recomputes each chunk of S, turns it in place into
// scale * G and feeds it to two more GEMMs (dq rows, dk accumulation).
// bf16/fp16 inputs are converted to float32 once (O(N*D)); float64 inputs (gradcheck) take a
// plain ATen float64 version of the same chunked algorithm.
// The exact contract is in mmkernels/contrastive/ops.py.

#include "contrastive.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace mmkernels {
namespace {

// Elements (float32) of the one R x M chunk buffer: R = max(1, min(N, BUDGET / M)).
constexpr int64_t BUDGET = int64_t(1) << 22;
// Columns per work item in the column-statistics pass (accumulators stay in L1).
constexpr int64_t COL_BLOCK = 128;
// A row is split into column segments only when a chunk has too few rows to keep
// every thread busy; a segment is never shorter than this.
constexpr int64_t MIN_SEGMENT = 4096;
// Roughly how many elements one parallel work item should cover.
constexpr int64_t GRAIN_ELEMS = int64_t(1) << 15;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Hot loops are compiled for several x86-64 levels and picked at load time (GCC, Linux).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__) && !defined(MMKERNELS_NO_MULTIVERSION)
#define MMK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))
#else
#define MMK_MULTIVERSION
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MMK_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define MMK_INLINE __forceinline
#else
#define MMK_INLINE inline
#endif

// The hot loops are written once, over a SIMD type: GCC/Clang vector extensions (16 float
// lanes, lowered to whatever width each multiversioned clone has), or plain float elsewhere.
// Explicit vectors rather than auto-vectorisation: GCC turns the clamps of exp() into branches
// and then refuses to vectorise the loop.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(MMKERNELS_SCALAR_KERNELS)
#define MMK_VECTOR_EXT 1
#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors are only passed between always-inline helpers: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#else
#define MMK_VECTOR_EXT 0
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NaN-propagating max (scalar).
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// The offset used for a log-sum-exp: the max when it is finite, else 0 (as torch.logsumexp),
// so that all -inf gives -inf and any +inf gives +inf.
inline float lse_shift(float m) { return std::isfinite(m) ? m : 0.0f; }

namespace simd {

#if MMK_VECTOR_EXT
constexpr int L = 16;
typedef float F __attribute__((vector_size(64)));
typedef int32_t I __attribute__((vector_size(64)));
typedef uint32_t U __attribute__((vector_size(64)));
typedef I M;  // lane mask: all ones / zero

MMK_INLINE I bits(const F& v) { return (I)v; }
MMK_INLINE F from_bits(const I& v) { return (F)v; }
template <class V>
MMK_INLINE V sel(const M& m, const V& a, const V& b) {
  return (V)(((I)a & m) | ((I)b & ~m));
}
MMK_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
MMK_INLINE void store(float* p, const F& v) { std::memcpy(p, &v, sizeof(v)); }
MMK_INLINE float lane(const F& v, int i) { return v[i]; }
MMK_INLINE M lanes_below(int64_t n) {
  const I idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return idx < (I{} + static_cast<int32_t>(n));
}

// Exact products of float lanes summed in double (for sum(G * S), which cancels).
typedef float F8 __attribute__((vector_size(32)));
typedef double D8 __attribute__((vector_size(64)));
struct DAcc {
  D8 lo = {}, hi = {};
};
MMK_INLINE void add_products(DAcc& acc, const F& a, const F& b) {
  F8 a0, a1, b0, b1;
  std::memcpy(&a0, &a, sizeof(a0));
  std::memcpy(&a1, reinterpret_cast<const char*>(&a) + sizeof(a0), sizeof(a1));
  std::memcpy(&b0, &b, sizeof(b0));
  std::memcpy(&b1, reinterpret_cast<const char*>(&b) + sizeof(b0), sizeof(b1));
  acc.lo += __builtin_convertvector(a0, D8) * __builtin_convertvector(b0, D8);
  acc.hi += __builtin_convertvector(a1, D8) * __builtin_convertvector(b1, D8);
}
MMK_INLINE double hsum(const DAcc& acc) {
  double s = 0.0;
  for (int i = 0; i < 8; ++i) s += acc.lo[i];
  for (int i = 0; i < 8; ++i) s += acc.hi[i];
  return s;
}
#else
constexpr int L = 1;
typedef float F;
typedef int32_t I;
typedef uint32_t U;
typedef bool M;

MMK_INLINE I bits(const F& v) {
  I i;
  std::memcpy(&i, &v, sizeof(i));
  return i;
}
MMK_INLINE F from_bits(const I& i) {
  F v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}
template <class V>
MMK_INLINE V sel(const M& m, const V& a, const V& b) {
  return m ? a : b;
}
MMK_INLINE F load(const float* p) { return *p; }
MMK_INLINE void store(float* p, const F& v) { *p = v; }
MMK_INLINE float lane(const F& v, int) { return v; }
MMK_INLINE M lanes_below(int64_t n) { return n > 0; }

struct DAcc {
  double v = 0.0;
};
MMK_INLINE void add_products(DAcc& acc, const F& a, const F& b) {
  acc.v += static_cast<double>(a) * static_cast<double>(b);
}
MMK_INLINE double hsum(const DAcc& acc) { return acc.v; }
#endif

template <class V, class S>
MMK_INLINE V splat(S a) {
  return V{} + a;
}
// Loads / stores of the first n (< L) lanes; the other lanes read as `fill`.
MMK_INLINE F load_n(const float* p, int64_t n, float fill) {
  float t[L];
  for (int i = 0; i < L; ++i) t[i] = i < n ? p[i] : fill;
  return load(t);
}
MMK_INLINE void store_n(float* p, const F& v, int64_t n) {
  float t[L];
  store(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
MMK_INLINE F vmax_nan(const F& a, const F& b) { return sel((a > b) | (a != a), a, b); }
MMK_INLINE float hmax_nan(const F& v) {
  float m = lane(v, 0);
  for (int i = 1; i < L; ++i) m = nan_max(m, lane(v, i));
  return m;
}
MMK_INLINE double hsum(const F& v) {
  double s = 0.0;
  for (int i = 0; i < L; ++i) s += static_cast<double>(lane(v, i));
  return s;
}

// The logit round(scale * s). Written so that it is never fused into a following subtraction
// (FMA contraction would skip this rounding, so the backward's exp(L - lse) would no longer see
// the same L as the forward: with logits in the thousands that is a 1e-4 relative error in G).
// x + 0.0f cannot be folded without -fno-signed-zeros, and fma(a, b, 0) rounds exactly like a * b.
MMK_INLINE F logit(float scale, const F& s) { return s * scale + 0.0f; }

// exp(x) in float32 without branches. Max relative error ~1.4 ulp over the normal range;
// exp(-inf) = 0, exp(+inf) = inf, exp(x > 88.72) = inf, gradual underflow below FLT_MIN,
// NaN -> NaN.
MMK_INLINE F exp(const F& x) {
  // Clamp x to [-104, 88.8] on its bit pattern (integer compares: no NaN semantics, no
  // branches): as uint32 every float <= -104 (and -inf, -NaN) is above bits(-104); as int32
  // every float >= 88.8 (and +inf, +NaN) is above bits(88.8). NaN is restored at the end.
  const U lo = splat<U>(0xC2D00000u);  // -104.0f
  const I hi = splat<I>(0x42B1999A);   // 88.8f
  U u = (U)bits(x);
  u = sel(u > lo, lo, u);
  I c = (I)u;
  c = sel(c > hi, hi, c);
  const F xc = from_bits(c);
  // n = round(x / ln 2) with the 1.5 * 2^23 trick: n sits in the low mantissa bits of t.
  const F magic = splat<F>(12582912.0f);
  const F t = xc * 1.44269504088896341f + magic;
  const F n = t - magic;
  const I ni = bits(t) - 0x4B400000;  // in [-150, 128]
  // r = x - n ln2 (Cody-Waite, two parts), |r| <= ln2 / 2; exp(r) = 1 + r + r^2 P(r).
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  F y = p * (r * r) + r + 1.0f;
  // y * 2^n as y * 2^n1 * 2^(n - n1): both factors are normal floats for n in [-150, 128], so
  // overflow to inf and gradual underflow come out of the multiplications.
  const I n1 = ni >> 1;
  y = y * from_bits((I)((U)(n1 + 127) << 23)) * from_bits((I)((U)(ni - n1 + 127) << 23));
  return sel(x != x, x, y);
}

}  // namespace simd

// Vectors summed in float32 before the partial sum is added in double.
constexpr int64_t FLUSH = 16;

// ---------------------------------------------------------------------------------------------
// The hot loops (multiversioned).

// One row segment of the forward: x <- scale * x in place; returns its max (NaN if any element
// is NaN) and its sum.
MMK_MULTIVERSION
void scale_max_sum(float* x, int64_t n, float scale, float* out_max, double* out_sum) {
  using namespace simd;
  F vmax = splat<F>(-kInf);
  double sum = 0.0;
  int64_t j = 0;
  while (j < n) {
    F acc = splat<F>(0.0f);
    const int64_t stop = std::min(n, j + FLUSH * L);
    for (; j + L <= stop; j += L) {
      const F v = logit(scale, load(x + j));
      store(x + j, v);
      vmax = vmax_nan(vmax, v);
      acc += v;
    }
    if (j < stop) {  // tail of the row, fewer than L elements
      const int64_t k = stop - j;
      const M valid = lanes_below(k);
      const F v = logit(scale, load_n(x + j, k, 0.0f));
      store_n(x + j, v, k);
      vmax = vmax_nan(vmax, sel(valid, v, splat<F>(-kInf)));
      acc += sel(valid, v, splat<F>(0.0f));
      j = stop;
    }
    sum += hsum(acc);
  }
  *out_max = hmax_nan(vmax);
  *out_sum = sum;
}

// sum_j exp(x[j] - shift) for a finite shift.
MMK_MULTIVERSION
double sum_exp(const float* x, int64_t n, float shift) {
  using namespace simd;
  double total = 0.0;
  int64_t j = 0;
  while (j < n) {
    F acc = splat<F>(0.0f);
    const int64_t stop = std::min(n, j + FLUSH * L);
    for (; j + L <= stop; j += L) acc += simd::exp(load(x + j) - shift);
    if (j < stop) {  // padded lanes are -inf: exp gives 0
      acc += simd::exp(load_n(x + j, stop - j, -kInf) - shift);
      j = stop;
    }
    total += hsum(acc);
  }
  return total;
}

// Column statistics of one block of cw (<= COL_BLOCK) columns over `rows` rows of the chunk
// (row stride ld), merged into the running per-column (max, sum exp(L - shift(max)), sum).
MMK_MULTIVERSION
void column_block(const float* b, int64_t rows, int64_t ld, int64_t cw, float* run_max,
                  double* run_sexp, double* run_sum) {
  using namespace simd;
  constexpr int64_t G = COL_BLOCK / L;
  static_assert(COL_BLOCK % L == 0, "COL_BLOCK must be a multiple of the SIMD width");
  const int64_t full = cw / L, tail = cw - full * L, groups = full + (tail ? 1 : 0);
  F cmax[G], acc[G], shift[G];
  float lanes[COL_BLOCK];
  double csum[COL_BLOCK], cexp[COL_BLOCK];
  for (int64_t g = 0; g < groups; ++g) cmax[g] = splat<F>(-kInf);
  for (int64_t j = 0; j < cw; ++j) csum[j] = cexp[j] = 0.0;

  // Pass 1: column max (NaN-propagating) and sum. Lanes past cw are never read back.
  for (int64_t r0 = 0; r0 < rows; r0 += FLUSH) {
    const int64_t r1 = std::min(rows, r0 + FLUSH);
    for (int64_t g = 0; g < groups; ++g) acc[g] = splat<F>(0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = b + r * ld;
      for (int64_t g = 0; g < full; ++g) {
        const F v = load(xr + g * L);
        cmax[g] = vmax_nan(cmax[g], v);
        acc[g] += v;
      }
      if (tail) {
        const F v = load_n(xr + full * L, tail, 0.0f);
        cmax[full] = vmax_nan(cmax[full], v);
        acc[full] += v;
      }
    }
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < L && g * L + i < cw; ++i) csum[g * L + i] += lane(acc[g], i);
  }

  // Merge into the running statistics: rescale the running sum of exponentials to the new max.
  for (int64_t g = 0; g < groups; ++g) store(lanes + g * L, cmax[g]);
  for (int64_t j = 0; j < cw; ++j) {
    const float old_max = run_max[j];
    const float new_max = nan_max(old_max, lanes[j]);
    const float new_shift = lse_shift(new_max);
    if (run_sexp[j] != 0.0) {
      run_sexp[j] *= std::exp(static_cast<double>(lse_shift(old_max)) - new_shift);
    }
    run_max[j] = new_max;
    run_sum[j] += csum[j];
    lanes[j] = new_shift;
  }
  for (int64_t j = cw; j < groups * L; ++j) lanes[j] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) shift[g] = load(lanes + g * L);

  // Pass 2: sum of exp(L - shift) per column.
  for (int64_t r0 = 0; r0 < rows; r0 += FLUSH) {
    const int64_t r1 = std::min(rows, r0 + FLUSH);
    for (int64_t g = 0; g < groups; ++g) acc[g] = splat<F>(0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = b + r * ld;
      for (int64_t g = 0; g < full; ++g) acc[g] += simd::exp(load(xr + g * L) - shift[g]);
      if (tail) acc[full] += simd::exp(load_n(xr + full * L, tail, -kInf) - shift[full]);
    }
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < L && g * L + i < cw; ++i) cexp[g * L + i] += lane(acc[g], i);
  }
  for (int64_t j = 0; j < cw; ++j) run_sexp[j] += cexp[j];
}

// Backward, one row segment: x holds S on entry and scale * G on exit (without the one-hot
// g_pos term, added by the caller). Returns sum_j G[j] * S[j], accumulated in double.
template <bool COLS>
MMK_INLINE double grad_segment(float* x, int64_t n, float scale, float g_lse, float lse,
                               float g_sum, const float* gc_lse, const float* c_lse,
                               const float* gc_sum) {
  using namespace simd;
  DAcc acc;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const F s = load(x + j);
    const F l = logit(scale, s);
    F g = g_lse * simd::exp(l - lse) + g_sum;
    if constexpr (COLS) g = g + load(gc_lse + j) * simd::exp(l - load(c_lse + j)) + load(gc_sum + j);
    add_products(acc, g, s);
    store(x + j, g * scale);
  }
  if (j < n) {  // tail, fewer than L elements; padded lanes contribute 0
    const int64_t k = n - j;
    const F s = load_n(x + j, k, 0.0f);
    const F l = logit(scale, s);
    F g = g_lse * simd::exp(l - lse) + g_sum;
    if constexpr (COLS) {
      g = g + load_n(gc_lse + j, k, 0.0f) * simd::exp(l - load_n(c_lse + j, k, 0.0f)) +
          load_n(gc_sum + j, k, 0.0f);
    }
    add_products(acc, sel(lanes_below(k), g, splat<F>(0.0f)), s);
    store_n(x + j, g * scale, k);
  }
  return hsum(acc);
}

MMK_MULTIVERSION
double grad_row_terms(float* x, int64_t n, float scale, float g_lse, float lse, float g_sum) {
  return grad_segment<false>(x, n, scale, g_lse, lse, g_sum, nullptr, nullptr, nullptr);
}

MMK_MULTIVERSION
double grad_row_col_terms(float* x, int64_t n, float scale, float g_lse, float lse, float g_sum,
                          const float* gc_lse, const float* c_lse, const float* gc_sum) {
  return grad_segment<true>(x, n, scale, g_lse, lse, g_sum, gc_lse, c_lse, gc_sum);
}

struct RowPartial {
  float max;
  double sum;
  double sumexp;  // sum exp(x - lse_shift(max))
};

RowPartial row_partial(float* x, int64_t n, float scale) {
  RowPartial p;
  scale_max_sum(x, n, scale, &p.max, &p.sum);
  p.sumexp = (p.max != p.max) ? static_cast<double>(kNaN) : sum_exp(x, n, lse_shift(p.max));
  return p;
}

// ---------------------------------------------------------------------------------------------
// Helpers.

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// One O(numel) conversion to a contiguous tensor of `dtype` (a no-op when it already is one).
// (Tensor::to(dtype, ..., MemoryFormat::Contiguous) alone returns a strided 2-D view unchanged.)
at::Tensor to_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  return r.contiguous();
}
at::Tensor to_f32_contiguous(const at::Tensor& t) { return to_contiguous(t, at::kFloat); }

void check_features(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.defined() && k.defined(), "mmkernels contrastive: q and k must be defined");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(),
              "mmkernels contrastive (cpu kernel): q and k must be CPU tensors, got ", q.device(),
              " and ", k.device());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2,
              "mmkernels contrastive: q and k must be 2-D [N, D] and [M, D], got shapes ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), "mmkernels contrastive: feature dims differ: q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(),
              "mmkernels contrastive: q and k must have the same dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  TORCH_CHECK(is_supported_dtype(q.scalar_type()),
              "mmkernels contrastive: unsupported dtype ", q.scalar_type(),
              " (float32, bfloat16, float16; float64 for gradcheck)");
}

float read_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.defined() && scale.device().is_cpu(),
              "mmkernels contrastive (cpu kernel): scale must be a CPU tensor");
  TORCH_CHECK(scale.numel() == 1, "mmkernels contrastive: scale must have one element, got shape ",
              scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()),
              "mmkernels contrastive: scale must be a floating tensor, got ", scale.scalar_type());
  return scale.to(at::kFloat).item<float>();
}
double read_scale_f64(const at::Tensor& scale) {
  read_scale(scale);  // the checks
  return scale.to(at::kDouble).item<double>();
}

at::Tensor read_targets(const at::Tensor& targets, int64_t n, int64_t m) {
  TORCH_CHECK(targets.defined() && targets.device().is_cpu(),
              "mmkernels contrastive (cpu kernel): targets must be a CPU tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n,
              "mmkernels contrastive: targets must have shape [", n, "], got ", targets.sizes());
  TORCH_CHECK(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
              "mmkernels contrastive: targets must be an integer tensor, got ",
              targets.scalar_type());
  at::Tensor t = to_contiguous(targets, at::kLong);
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < m, "mmkernels contrastive: targets[", i, "] = ", tp[i],
                " is out of range [0, ", m, ")");
  }
  return t;
}

// A vector argument of the backward: shape [n], any float dtype / strides, returned contiguous
// in `dtype` (float32, or float64 on the float64 path).
at::Tensor read_vector(const at::Tensor& v, int64_t n, const char* name,
                       at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(v.defined() && v.device().is_cpu(), "mmkernels contrastive (cpu kernel): ", name,
              " must be a CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "mmkernels contrastive: ", name,
              " must have shape [", n, "], got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "mmkernels contrastive: ", name,
              " must be floating, got ", v.scalar_type());
  return to_contiguous(v, dtype);
}

int64_t chunk_rows(int64_t n, int64_t m) {
  if (m <= 0) return std::max<int64_t>(1, n);
  return std::max<int64_t>(1, std::min<int64_t>(n, BUDGET / m));
}

// How a chunk of rc rows x m columns is cut into row-segment work items.
struct RowSplit {
  int64_t segments;  // per row
  int64_t width;     // columns per segment (last one may be shorter)
  int64_t grain;     // work items per parallel_for grain
};

RowSplit split_rows(int64_t rc, int64_t m) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t segs = 1;
  if (rc < 4 * threads) {
    segs = std::max<int64_t>(1, std::min(ceil_div(m, MIN_SEGMENT), ceil_div(4 * threads, rc)));
  }
  const int64_t width = std::max<int64_t>(1, ceil_div(m, segs));
  segs = std::max<int64_t>(1, ceil_div(m, width));
  return {segs, width, std::max<int64_t>(1, GRAIN_ELEMS / width)};
}

// ---------------------------------------------------------------------------------------------
// float64 inputs (gradcheck): the same chunked algorithm written with ATen ops in float64.
// Correctness only; chunks still bound the memory (a few R x M float64 temporaries).

at::Tensor lse_shift_t(const at::Tensor& m) {
  return at::where(at::isfinite(m), m, at::zeros_like(m));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
stats_f64(const at::Tensor& q, const at::Tensor& k, double sc, const at::Tensor& tgt,
          bool with_columns) {
  const int64_t N = q.size(0), M = k.size(0);
  const auto f64 = q.options().dtype(at::kDouble);
  const at::Tensor qd = q.contiguous(), kT = k.contiguous().t();
  at::Tensor row_lse = at::empty({N}, f64), row_max = at::empty({N}, f64),
             row_sum = at::empty({N}, f64), pos = at::empty({N}, f64);
  const int64_t MC = with_columns ? M : 0;
  at::Tensor run_max = at::full({MC}, -std::numeric_limits<double>::infinity(), f64);
  at::Tensor run_sexp = at::zeros({MC}, f64), run_sum = at::zeros({MC}, f64);
  const int64_t R = chunk_rows(N, M);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor L = at::mm(qd.narrow(0, r0, rc), kT).mul_(sc);
    row_max.narrow(0, r0, rc).copy_(std::get<0>(L.max(1)));  // max propagates NaN
    row_sum.narrow(0, r0, rc).copy_(L.sum(1));
    row_lse.narrow(0, r0, rc).copy_(at::logsumexp(L, {1}));
    pos.narrow(0, r0, rc).copy_(L.gather(1, tgt.narrow(0, r0, rc).unsqueeze(1)).squeeze(1));
    if (with_columns) {
      const at::Tensor new_max = at::maximum(run_max, std::get<0>(L.max(0)));
      const at::Tensor new_shift = lse_shift_t(new_max);
      const at::Tensor rescaled =
          at::where(run_sexp == 0, run_sexp, run_sexp * at::exp(lse_shift_t(run_max) - new_shift));
      run_sexp = rescaled + at::exp(L - new_shift.unsqueeze(0)).sum(0);
      run_sum.add_(L.sum(0));
      run_max = new_max;
    }
  }
  at::Tensor col_lse = at::where(at::isnan(run_max), run_max, lse_shift_t(run_max) + at::log(run_sexp));
  return std::make_tuple(row_lse, row_max, row_sum, pos, col_lse, run_max, run_sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
grads_f64(const at::Tensor& q, const at::Tensor& k, double sc, const at::Tensor& tgt,
          const at::Tensor& rl, const at::Tensor& cl, const at::Tensor& grl, const at::Tensor& grs,
          const at::Tensor& gp, const at::Tensor& gcl, const at::Tensor& gcs, bool cols) {
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const auto f64 = q.options().dtype(at::kDouble);
  const at::Tensor qd = q.contiguous(), kd = k.contiguous();
  at::Tensor dq = at::empty({N, D}, f64), dk = at::zeros({M, D}, f64);
  at::Tensor dscale = at::zeros({}, f64);
  const int64_t R = chunk_rows(N, M);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor q_rows = qd.narrow(0, r0, rc);
    const at::Tensor S = at::mm(q_rows, kd.t());
    const at::Tensor L = S * sc;
    at::Tensor G = at::exp(L - rl.narrow(0, r0, rc).unsqueeze(1)) * grl.narrow(0, r0, rc).unsqueeze(1) +
                   grs.narrow(0, r0, rc).unsqueeze(1);
    if (cols) G = G + at::exp(L - cl.unsqueeze(0)) * gcl.unsqueeze(0) + gcs.unsqueeze(0);
    G.scatter_add_(1, tgt.narrow(0, r0, rc).unsqueeze(1), gp.narrow(0, r0, rc).unsqueeze(1));
    dscale.add_((G * S).sum());
    at::Tensor dq_rows = dq.narrow(0, r0, rc);
    at::mm_out(dq_rows, G, kd).mul_(sc);
    dk.addmm_(G.t(), q_rows, /*beta=*/1, /*alpha=*/sc);
  }
  return std::make_tuple(dq, dk, dscale);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& targets, bool with_columns) {
  check_features(q, k);
  const int64_t N = q.size(0), M = k.size(0);
  TORCH_CHECK(M > 0 || N == 0, "mmkernels contrastive: k has no rows but q has ", N);
  const at::Tensor tgt = read_targets(targets, N, M);
  if (q.scalar_type() == at::kDouble) {
    return stats_f64(q, k, read_scale_f64(scale), tgt, with_columns);
  }
  const float sc = read_scale(scale);

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor row_lse = at::empty({N}, f32), row_max = at::empty({N}, f32),
             row_sum = at::empty({N}, f32), pos = at::empty({N}, f32);
  const int64_t MC = with_columns ? M : 0;
  at::Tensor col_lse = at::empty({MC}, f32), col_max = at::empty({MC}, f32),
             col_sum = at::empty({MC}, f32);

  const at::Tensor qf = to_f32_contiguous(q);
  const at::Tensor kf = to_f32_contiguous(k);
  const at::Tensor kT = kf.t();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  float* o_lse = row_lse.data_ptr<float>();
  float* o_max = row_max.data_ptr<float>();
  float* o_sum = row_sum.data_ptr<float>();
  float* o_pos = pos.data_ptr<float>();

  // Running column statistics (O(M)).
  std::vector<float> run_max(MC, -kInf);
  std::vector<double> run_sexp(MC, 0.0), run_sum(MC, 0.0);

  const int64_t R = chunk_rows(N, M);
  at::Tensor buf = at::empty({R, std::max<int64_t>(M, 1)}, f32);
  std::vector<RowPartial> parts;

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    at::Tensor chunk = buf.narrow(0, 0, rc).narrow(1, 0, M);  // contiguous [rc, M]
    at::mm_out(chunk, qf.narrow(0, r0, rc), kT);
    float* B = chunk.data_ptr<float>();

    // Rows: L = scale * S in place; per segment max / sum / sum exp.
    const RowSplit sp = split_rows(rc, M);
    parts.resize(static_cast<size_t>(rc * sp.segments));
    at::parallel_for(0, rc * sp.segments, sp.grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / sp.segments, c0 = (it % sp.segments) * sp.width;
        const int64_t c1 = std::min(M, c0 + sp.width);
        parts[it] = row_partial(B + r * M + c0, c1 - c0, sc);
      }
    });
    for (int64_t r = 0; r < rc; ++r) {
      const RowPartial* p = parts.data() + r * sp.segments;
      float m = p[0].max;
      double s = p[0].sum;
      for (int64_t c = 1; c < sp.segments; ++c) {
        m = nan_max(m, p[c].max);
        s += p[c].sum;
      }
      const float shift = lse_shift(m);
      double se = 0.0;
      for (int64_t c = 0; c < sp.segments; ++c) {
        if (p[c].sumexp != 0.0) {
          se += sp.segments == 1
                    ? p[c].sumexp
                    : p[c].sumexp * std::exp(static_cast<double>(lse_shift(p[c].max)) - shift);
        }
      }
      const int64_t i = r0 + r;
      o_max[i] = m;
      o_sum[i] = static_cast<float>(s);
      o_lse[i] = (m != m) ? m : static_cast<float>(shift + std::log(se));
      o_pos[i] = B[r * M + tp[i]];  // the same computed logit that fed row_max / col_max
    }

    // Columns: online log-sum-exp merge into the running statistics.
    if (with_columns) {
      const int64_t nblk = ceil_div(M, COL_BLOCK);
      const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMS / (rc * COL_BLOCK));
      at::parallel_for(0, nblk, grain, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t c0 = blk * COL_BLOCK, cw = std::min(COL_BLOCK, M - c0);
          column_block(B + c0, rc, M, cw, run_max.data() + c0, run_sexp.data() + c0,
                       run_sum.data() + c0);
        }
      });
    }
  }

  if (with_columns) {
    float* c_lse = col_lse.data_ptr<float>();
    float* c_max = col_max.data_ptr<float>();
    float* c_sum = col_sum.data_ptr<float>();
    for (int64_t j = 0; j < M; ++j) {
      const float m = run_max[j];
      c_max[j] = m;
      c_sum[j] = static_cast<float>(run_sum[j]);
      c_lse[j] = (m != m) ? m : static_cast<float>(lse_shift(m) + std::log(run_sexp[j]));
    }
  }
  return std::make_tuple(row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum);
}

// ---------------------------------------------------------------------------------------------
// Backward.

std::tuple<at::Tensor, at::Tensor, at::Tensor>
contrastive_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& targets, const at::Tensor& row_lse, const at::Tensor& col_lse,
                  const at::Tensor& g_row_lse, const at::Tensor& g_row_sum, const at::Tensor& g_pos,
                  const at::Tensor& g_col_lse, const at::Tensor& g_col_sum) {
  check_features(q, k);
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  TORCH_CHECK(M > 0 || N == 0, "mmkernels contrastive: k has no rows but q has ", N);
  const at::Tensor tgt = read_targets(targets, N, M);

  TORCH_CHECK(col_lse.defined() && g_col_lse.defined() && g_col_sum.defined(),
              "mmkernels contrastive: col_lse, g_col_lse, g_col_sum must be defined "
              "(empty [0] tensors when there are no column terms)");
  const bool cols = col_lse.numel() != 0 || g_col_lse.numel() != 0 || g_col_sum.numel() != 0;
  const int64_t MC = cols ? M : 0;
  // Statistics and upstream gradients in the compute dtype: float32, or float64 for float64 input.
  const bool f64 = q.scalar_type() == at::kDouble;
  const at::ScalarType vt = f64 ? at::kDouble : at::kFloat;
  const at::Tensor rl = read_vector(row_lse, N, "row_lse", vt);
  const at::Tensor grl = read_vector(g_row_lse, N, "g_row_lse", vt);
  const at::Tensor grs = read_vector(g_row_sum, N, "g_row_sum", vt);
  const at::Tensor gp = read_vector(g_pos, N, "g_pos", vt);
  const at::Tensor cl = read_vector(col_lse, MC, "col_lse", vt);
  const at::Tensor gcl = read_vector(g_col_lse, MC, "g_col_lse", vt);
  const at::Tensor gcs = read_vector(g_col_sum, MC, "g_col_sum", vt);
  if (f64) return grads_f64(q, k, read_scale_f64(scale), tgt, rl, cl, grl, grs, gp, gcl, gcs, cols);
  const float sc = read_scale(scale);

  const at::Tensor qf = to_f32_contiguous(q);
  const at::Tensor kf = to_f32_contiguous(k);
  const at::Tensor kT = kf.t();
  const auto f32 = q.options().dtype(at::kFloat);
  // dq rows are final after their chunk: written straight into the output (through one R x D
  // float32 staging buffer when the output is bf16/fp16). dk sums over chunks: float32 throughout.
  const bool dq_f32 = q.scalar_type() == at::kFloat;
  at::Tensor dq = at::empty({N, D}, q.options());
  at::Tensor dk = at::zeros({M, D}, f32);

  const int64_t* tp = tgt.data_ptr<int64_t>();
  const float* p_rl = rl.data_ptr<float>();
  const float* p_grl = grl.data_ptr<float>();
  const float* p_grs = grs.data_ptr<float>();
  const float* p_gp = gp.data_ptr<float>();
  const float* p_cl = cols ? cl.data_ptr<float>() : nullptr;
  const float* p_gcl = cols ? gcl.data_ptr<float>() : nullptr;
  const float* p_gcs = cols ? gcs.data_ptr<float>() : nullptr;

  const int64_t R = chunk_rows(N, M);
  at::Tensor buf = at::empty({R, std::max<int64_t>(M, 1)}, f32);
  at::Tensor dq_stage = dq_f32 ? at::Tensor() : at::empty({std::min(R, N), D}, f32);
  std::vector<double> dsc_parts;
  std::vector<float> s_target(static_cast<size_t>(R));
  double dscale = 0.0;

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    at::Tensor chunk = buf.narrow(0, 0, rc).narrow(1, 0, M);
    const at::Tensor q_rows = qf.narrow(0, r0, rc);
    at::mm_out(chunk, q_rows, kT);
    float* B = chunk.data_ptr<float>();
    for (int64_t r = 0; r < rc; ++r) s_target[r] = B[r * M + tp[r0 + r]];

    // S -> scale * G in place, sum(G * S) per work item.
    const RowSplit sp = split_rows(rc, M);
    dsc_parts.assign(static_cast<size_t>(rc * sp.segments), 0.0);
    at::parallel_for(0, rc * sp.segments, sp.grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / sp.segments, c0 = (it % sp.segments) * sp.width;
        const int64_t c1 = std::min(M, c0 + sp.width);
        const int64_t i = r0 + r;
        float* x = B + r * M + c0;
        dsc_parts[it] =
            cols ? grad_row_col_terms(x, c1 - c0, sc, p_grl[i], p_rl[i], p_grs[i], p_gcl + c0,
                                      p_cl + c0, p_gcs + c0)
                 : grad_row_terms(x, c1 - c0, sc, p_grl[i], p_rl[i], p_grs[i]);
      }
    });
    for (int64_t r = 0; r < rc; ++r) {
      const int64_t i = r0 + r;
      B[r * M + tp[i]] += sc * p_gp[i];
      double acc = static_cast<double>(p_gp[i]) * static_cast<double>(s_target[r]);
      for (int64_t c = 0; c < sp.segments; ++c) acc += dsc_parts[r * sp.segments + c];
      dscale += acc;
    }

    // dq rows = (scale G) @ k ; dk += (scale G)^T @ q_rows.
    at::Tensor dq_rows = dq_f32 ? dq.narrow(0, r0, rc) : dq_stage.narrow(0, 0, rc);
    at::mm_out(dq_rows, chunk, kf);
    if (!dq_f32) dq.narrow(0, r0, rc).copy_(dq_rows);
    dk.addmm_(chunk.t(), q_rows);
  }

  at::Tensor dscale_t = at::scalar_tensor(static_cast<double>(static_cast<float>(dscale)), f32);
  return std::make_tuple(dq, dk.to(k.scalar_type()), dscale_t);
}

}  // namespace mmkernels
