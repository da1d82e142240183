// mmkernels: cross-attention (few queries over a few hundred image tokens) on the CPU.
//
// The definition is mmkernels/cross_attention/reference.py: s = scale * q k^T, -inf where the key
// is padding, m = max_j s, l = sum_j exp(s - m), P = exp(s - m) / l, attention dropout from the counter hash of
// the reference's dropout_hash (a pure function of (seed, b, h, i, j)), out = (P * keep / (1-p)) v.
//
// Forward: parallel over (batch, head, query block of <= 128 rows). Per key block (the whole of Lk when
// Lk <= 1024, else blocks of 256 with an online softmax) S = scale * Q K^T goes through BLAS into
// a BM x BN buffer, padded keys become -inf (blocks that are all padding are skipped), the row
// softmax statistics use the un-dropped probabilities, then dropped entries are zeroed and P V is
// accumulated; 1/l and 1/(1-p) are applied once at the end. The row max m and the sum l are
// saved separately (never as one rounded lse = m + log l, whose rounding at large scores would be
// a relative error of every recomputed P) together with lse, which is for inspection only.
// Backward: parallel over (batch, head) pairs; a task owns its pair's dq, dk and dv (no atomics):
// for each query block and key block it recomputes P = exp(S - m) / l and dP = dO V^T, forms
// Pd = P * keep / (1-p) and dS = P * (dP * keep / (1-p) - delta), and accumulates dV += Pd^T dO,
// dK += scale dS^T Q, dQ += scale dS K in per-pair buffers.
// delta = rowsum(Pd * dP) is taken from the tile when one key block covers Lk (exact: the
// identity delta = rowsum(dO * O) loses accuracy when O is rounded to bf16/fp16), else it is
// rowsum(dO * O) as in FlashAttention.
// Scratch: per thread, two BM x BN tiles and O((Lq + Lk) * D) pair buffers; nothing of size
// B*H*Lq*Lk. Inputs are read with their strides: float32/float64 rows with unit last stride go
// to BLAS in place (e.g. the K/V views of fused_kv_projection); other layouts and bf16/fp16 are
// converted per (b, h) pair into thread-local float32 buffers. float64 is computed in float64.
// GEMMs: the Fortran sgemm_/dgemm_ exported by torch's CPU library (weak symbols), else ATen.

#include "cross_attention.h"
#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace mmkernels {
namespace {

constexpr int64_t BM_MAX = 128;    // query rows per block (the fastest of 32 .. 256 on the CPU
                                   // benchmarks: bench/results)
inline int64_t block_m(int64_t lq) { return std::min<int64_t>(std::max<int64_t>(lq, 1), BM_MAX); }
constexpr int64_t BN_WHOLE = 1024;  // Lk up to this: one key block (no online rescaling)
constexpr int64_t BN_LONG = 256;    // key block for longer Lk

inline int64_t block_n(int64_t lk) { return lk <= BN_WHOLE ? std::max<int64_t>(lk, 1) : BN_LONG; }

using namespace cpu_math;  // ceil_div, gemm_rm, the vector helpers and the softmax row loops

// ----------------------------------------------------------------------------- dropout hash

// The hash's 32-bit finaliser, on one word or on the 8 lanes of a vu.
template <typename U>
CPU_MATH_INLINE U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t s0 = 0, s1 = 0, thr = 0;
  double inv_keep = 1.0;  // 1 / (1 - p)
  // The per-row word a = mix(row * 0x9E3779B9 + s0), row = (b * H + h) * Lq + i (mod 2^32).
  uint32_t row_word(int64_t row) const { return mix32(uint32_t(uint64_t(row)) * 0x9E3779B9u + s0); }
  // words[i] = row_word(row0 + i) for i < m, when dropout is on.
  void row_words(int64_t row0, int64_t m, uint32_t* words) const {
    if (on)
      for (int64_t i = 0; i < m; ++i) words[i] = row_word(row0 + i);
  }
  // Whether key j of the row with word a is kept.
  bool keeps(uint32_t a, uint32_t j) const { return mix32(a + j * 0x85EBCA6Bu + s1) >= thr; }
};

#if CPU_MATH_VEC
// Keep mask (all ones / zeros per lane) of keys jj .. jj + 7 for the row word a (Dropout::keeps).
CPU_MATH_INLINE vi vkeep(uint32_t a, uint32_t jj, uint32_t s1, uint32_t thr) {
  const vu lane = {0u, 1u, 2u, 3u, 4u, 5u, 6u, 7u};
  const vu j = lane + jj;
  const vu u = mix32(j * 0x85EBCA6Bu + (a + s1));
  return (vi)(u >= thr);
}
#endif

// ----------------------------------------------------------------------------- dropout row loops

// The scalar loops of the row functions below, from index j to n: the float32 versions finish
// their vector loop's remainder with them, the float64 versions run them whole.
template <typename T>
CPU_MATH_INLINE void row_drop_from(T* s, int64_t j, int64_t n, uint32_t a, int64_t j0,
                                   const Dropout& dr) {
  for (; j < n; ++j)
    if (!dr.keeps(a, uint32_t(j0 + j))) s[j] = T(0);
}
template <typename T>
CPU_MATH_INLINE void row_grad_split_from(T* p, T* ds, int64_t j, int64_t n, T m, T inv_l, T di,
                                         bool drop, uint32_t a, int64_t j0, const Dropout& dr, T inv) {
  for (; j < n; ++j) {
    const T e = std::exp(p[j] - m) * inv_l;
    T f = T(1);
    if (drop) f = dr.keeps(a, uint32_t(j0 + j)) ? inv : T(0);
    p[j] = e * f;
    ds[j] = e * (ds[j] * f - di);
  }
}
// row_grad_whole's first pass: p = e, frow = f; returns delta + sum of e * f * ds.
template <typename T>
CPU_MATH_INLINE T whole_delta_from(T* p, const T* ds, T* frow, int64_t j, int64_t n, T m, T inv_l,
                                   bool drop, uint32_t a, const Dropout& dr, T inv, T delta) {
  for (; j < n; ++j) {
    const T e = std::exp(p[j] - m) * inv_l;
    T f = T(1);
    if (drop) f = dr.keeps(a, uint32_t(j)) ? inv : T(0);
    p[j] = e;
    frow[j] = f;
    delta += e * f * ds[j];
  }
  return delta;
}
// row_grad_whole's second pass: p = e * f, ds = e * (ds * f - delta).
template <typename T>
CPU_MATH_INLINE void whole_apply_from(T* p, T* ds, const T* frow, int64_t j, int64_t n, T delta) {
  for (; j < n; ++j) {
    const T e = p[j], f = frow[j];
    p[j] = e * f;
    ds[j] = e * (ds[j] * f - delta);
  }
}

// s[j] = 0 where dropout drops key j0 + j of the row with word a.
CPU_MATH_MULTIVERSION void row_drop(float* s, int64_t n, uint32_t a, int64_t j0, const Dropout& dr) {
  int64_t j = 0;
#if CPU_MATH_VEC
  for (; j + VL <= n; j += VL) {
    const vi keep = vkeep(a, uint32_t(j0 + j), dr.s1, dr.thr);
    vstore(s + j, keep ? vload(s + j) : vsplat(0.0f));
  }
#endif
  row_drop_from(s, j, n, a, j0, dr);
}

// e = exp(p - m) / l (the row max m and sum l kept apart, see the top), f = keep ? 1/(1-p) : 0
// with dropout, else 1; p = e * f; ds = e * (ds * f - di).
CPU_MATH_MULTIVERSION void row_grad_split(float* p, float* ds, int64_t n, float m, float inv_l,
                                          float di, bool drop, uint32_t a, int64_t j0,
                                          const Dropout& dr, float inv) {
  int64_t j = 0;
#if CPU_MATH_VEC
  for (; j + VL <= n; j += VL) {
    const vf e = vexp_neg(vload(p + j) - m) * inv_l;
    vf f = vsplat(1.0f);
    if (drop) f = vkeep(a, uint32_t(j0 + j), dr.s1, dr.thr) ? vsplat(inv) : vsplat(0.0f);
    vstore(p + j, e * f);
    vstore(ds + j, e * (vload(ds + j) * f - di));
  }
#endif
  row_grad_split_from(p, ds, j, n, m, inv_l, di, drop, a, j0, dr, inv);
}

// Whole-row variant (the row's keys all lie in this tile): delta = sum_j P_ij * f_ij * dP_ij from
// the tile itself (exact, unlike rowsum(dO * O) with O rounded to 16 bits), then as row_grad(_drop).
// f = keep ? 1/(1-p) : 0 (1 without dropout); frow: scratch of n floats.
CPU_MATH_MULTIVERSION void row_grad_whole(float* p, float* ds, float* frow, int64_t n, float m,
                                          float inv_l, bool drop, uint32_t a, const Dropout& dr,
                                          float inv) {
  int64_t j = 0;
  float delta = 0.0f;
#if CPU_MATH_VEC
  vf acc = vsplat(0.0f);
  for (; j + VL <= n; j += VL) {
    const vf e = vexp_neg(vload(p + j) - m) * inv_l;
    vf f = vsplat(1.0f);
    if (drop) f = vkeep(a, uint32_t(j), dr.s1, dr.thr) ? vsplat(inv) : vsplat(0.0f);
    vstore(p + j, e);
    vstore(frow + j, f);
    acc += e * f * vload(ds + j);
  }
  for (int l = 0; l < VL; ++l) delta += acc[l];
#endif
  delta = whole_delta_from(p, ds, frow, j, n, m, inv_l, drop, a, dr, inv, delta);
  j = 0;
#if CPU_MATH_VEC
  for (; j + VL <= n; j += VL) {
    const vf e = vload(p + j), f = vload(frow + j);
    vstore(p + j, e * f);
    vstore(ds + j, e * (vload(ds + j) * f - delta));
  }
#endif
  whole_apply_from(p, ds, frow, j, n, delta);
}

inline void row_drop(double* s, int64_t n, uint32_t a, int64_t j0, const Dropout& dr) {
  row_drop_from(s, 0, n, a, j0, dr);
}
inline void row_grad_split(double* p, double* ds, int64_t n, double m, double inv_l, double di,
                           bool drop, uint32_t a, int64_t j0, const Dropout& dr, double inv) {
  row_grad_split_from(p, ds, 0, n, m, inv_l, di, drop, a, j0, dr, inv);
}
inline void row_grad_whole(double* p, double* ds, double* frow, int64_t n, double m, double inv_l,
                           bool drop, uint32_t a, const Dropout& dr, double inv) {
  const double delta = whole_delta_from(p, ds, frow, 0, n, m, inv_l, drop, a, dr, inv, 0.0);
  whole_apply_from(p, ds, frow, 0, n, delta);
}

// s[j] = -inf where key j is padding.
template <typename T>
inline void row_mask(T* s, const bool* valid, int64_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) s[j] = valid[j] ? s[j] : ninf;
}

// ----------------------------------------------------------------------------- problem

constexpr int8_t BLOCK_NONE = 0;     // every key of the block is padding: skipped
constexpr int8_t BLOCK_ALL = 1;      // no padding in the block
constexpr int8_t BLOCK_PARTIAL = 2;  // some padding: per-element -inf

struct Problem {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
  int64_t BM = 1, BN = 1, TK = 0, TQ = 0;
  const bool* valid = nullptr;  // [B, Lk] contiguous, or nullptr (no padding)
  std::vector<int8_t> blocks;   // [B, TK]
  Dropout drop;

  int8_t block(int64_t b, int64_t kb) const { return valid ? blocks[b * TK + kb] : BLOCK_ALL; }
};

struct Strides {
  int64_t s[4];
  explicit Strides(const at::Tensor& t) {
    for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
  }
};

// `rows` x D operand of a GEMM starting at `base` (row stride rs, column stride cs). Returned in
// place when it is already a row-major acc_t matrix (unit column stride, rows not overlapping),
// else converted into `buf` (ld D).
template <typename scalar_t, typename acc_t>
const acc_t* operand(const scalar_t* base, int64_t rs, int64_t cs, int64_t rows, int64_t D,
                     std::vector<acc_t>& buf, int64_t& ld) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    if (cs == 1 && rs >= D && rs <= INT32_MAX) {
      ld = rs;
      return base;
    }
    if (cs == 1 && rows == 1) {
      ld = D;
      return base;
    }
  }
  if (int64_t(buf.size()) < rows * D) buf.resize(rows * D);
  acc_t* dst = buf.data();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + r * rs;
    acc_t* d = dst + r * D;
    if (cs == 1) {
      for (int64_t c = 0; c < D; ++c) d[c] = static_cast<acc_t>(src[c]);
    } else {
      for (int64_t c = 0; c < D; ++c) d[c] = static_cast<acc_t>(src[c * cs]);
    }
  }
  ld = D;
  return dst;
}

// ----------------------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t>
void fwd_kernel(const Problem& P, const scalar_t* Q, const Strides& qs, const scalar_t* K,
                const Strides& ks, const scalar_t* V, const Strides& vs, scalar_t* O, acc_t* L,
                acc_t* M, acc_t* Lsum, acc_t scale) {
  const int64_t D = P.D, Lq = P.Lq, Lk = P.Lk, BM = P.BM, BN = P.BN, TQ = P.TQ, TK = P.TK, H = P.H;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_keep = static_cast<acc_t>(P.drop.inv_keep);
  at::parallel_for(0, P.B * H * TQ, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> S(BM * BN), acc(BM * D), mrow(BM), lrow(BM), qbuf, kbuf, vbuf;
    std::vector<uint32_t> words(BM);
    int64_t cur_pair = -1, ldq = D, ldk = D, ldv = D;
    const acc_t *kp = nullptr, *vp = nullptr;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t pair = task / TQ, qb = task % TQ, b = pair / H, h = pair % H;
      if (pair != cur_pair) {
        kp = operand<scalar_t, acc_t>(K + b * ks.s[0] + h * ks.s[1], ks.s[2], ks.s[3], Lk, D, kbuf, ldk);
        vp = operand<scalar_t, acc_t>(V + b * vs.s[0] + h * vs.s[1], vs.s[2], vs.s[3], Lk, D, vbuf, ldv);
        cur_pair = pair;
      }
      const int64_t i0 = qb * BM, m = std::min(BM, Lq - i0);
      const acc_t* qp = operand<scalar_t, acc_t>(Q + b * qs.s[0] + h * qs.s[1] + i0 * qs.s[2], qs.s[2],
                                                 qs.s[3], m, D, qbuf, ldq);
      std::fill(acc.begin(), acc.begin() + m * D, acc_t(0));
      std::fill(mrow.begin(), mrow.end(), ninf);
      std::fill(lrow.begin(), lrow.end(), acc_t(0));
      P.drop.row_words(pair * Lq + i0, m, words.data());
      for (int64_t kb = 0; kb < TK; ++kb) {
        const int8_t st = P.block(b, kb);
        if (st == BLOCK_NONE) continue;
        const int64_t j0 = kb * BN, n = std::min(BN, Lk - j0);
        gemm_rm<acc_t>(false, true, m, n, D, scale, qp, ldq, kp + j0 * ldk, ldk, acc_t(0), S.data(), BN);
        for (int64_t i = 0; i < m; ++i) {
          acc_t* s = S.data() + i * BN;
          if (st == BLOCK_PARTIAL) row_mask(s, P.valid + b * Lk + j0, n);
          const acc_t mx = row_max(s, n, mrow[i]);
          if (mx == ninf) {  // nothing visible so far: contributes nothing
            std::fill(s, s + n, acc_t(0));
            continue;
          }
          const acc_t sum = row_exp_sum(s, n, mx);
          const acc_t a = std::exp(mrow[i] - mx);  // 0 when mrow was -inf
          lrow[i] = lrow[i] * a + sum;
          mrow[i] = mx;
          if (a != acc_t(1)) {
            acc_t* ac = acc.data() + i * D;
            for (int64_t c = 0; c < D; ++c) ac[c] *= a;
          }
          if (P.drop.on) row_drop(s, n, words[i], j0, P.drop);
        }
        gemm_rm<acc_t>(false, false, m, D, n, acc_t(1), S.data(), BN, vp + j0 * ldv, ldv, acc_t(1),
                       acc.data(), D);
      }
      scalar_t* o = O + (pair * Lq + i0) * D;
      acc_t* l = L + pair * Lq + i0;
      acc_t* rmax = M + pair * Lq + i0;
      acc_t* rsum = Lsum + pair * Lq + i0;
      for (int64_t i = 0; i < m; ++i) {
        const acc_t* ac = acc.data() + i * D;
        if (lrow[i] > acc_t(0)) {
          const acc_t inv = inv_keep / lrow[i];
          for (int64_t c = 0; c < D; ++c) o[i * D + c] = static_cast<scalar_t>(ac[c] * inv);
          l[i] = mrow[i] + std::log(lrow[i]);
          rmax[i] = mrow[i];
          rsum[i] = lrow[i];
        } else {
          for (int64_t c = 0; c < D; ++c) o[i * D + c] = static_cast<scalar_t>(0);
          l[i] = ninf;
          rmax[i] = ninf;
          rsum[i] = acc_t(0);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
void bwd_kernel(const Problem& P, const scalar_t* Q, const Strides& qs, const scalar_t* K,
                const Strides& ks, const scalar_t* V, const Strides& vs, const scalar_t* O,
                const Strides& os, const scalar_t* dO, const Strides& dos, const acc_t* M,
                const acc_t* Lsum, scalar_t* dQ, scalar_t* dK, scalar_t* dV, acc_t scale) {
  const int64_t D = P.D, Lq = P.Lq, Lk = P.Lk, BM = P.BM, BN = P.BN, TQ = P.TQ, TK = P.TK, H = P.H;
  const acc_t inv_keep = static_cast<acc_t>(P.drop.inv_keep);
  at::parallel_for(0, P.B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> S(BM * BN), dS(BM * BN), frow(BN), delta(BM), dq(Lq * D), dk(Lk * D), dv(Lk * D);
    std::vector<acc_t> qbuf, dobuf, kbuf, vbuf;
    std::vector<uint32_t> words(BM);
    for (int64_t pair = lo; pair < hi; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      int64_t ldk = D, ldv = D, ldq = D, lddo = D;
      const acc_t* kp = operand<scalar_t, acc_t>(K + b * ks.s[0] + h * ks.s[1], ks.s[2], ks.s[3], Lk, D, kbuf, ldk);
      const acc_t* vp = operand<scalar_t, acc_t>(V + b * vs.s[0] + h * vs.s[1], vs.s[2], vs.s[3], Lk, D, vbuf, ldv);
      std::fill(dq.begin(), dq.end(), acc_t(0));
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      bool any_block = false;
      for (int64_t kb = 0; kb < TK; ++kb) any_block = any_block || P.block(b, kb) != BLOCK_NONE;
      for (int64_t qb = 0; qb < TQ && any_block; ++qb) {
        const int64_t i0 = qb * BM, m = std::min(BM, Lq - i0);
        const scalar_t* qrow = Q + b * qs.s[0] + h * qs.s[1] + i0 * qs.s[2];
        const scalar_t* dorow = dO + b * dos.s[0] + h * dos.s[1] + i0 * dos.s[2];
        const scalar_t* orow = O + b * os.s[0] + h * os.s[1] + i0 * os.s[2];
        const acc_t* qp = operand<scalar_t, acc_t>(qrow, qs.s[2], qs.s[3], m, D, qbuf, ldq);
        const acc_t* dop = operand<scalar_t, acc_t>(dorow, dos.s[2], dos.s[3], m, D, dobuf, lddo);
        const acc_t* rmax = M + pair * Lq + i0;
        const acc_t* rsum = Lsum + pair * Lq + i0;
        for (int64_t i = 0; i < m && TK > 1; ++i) {  // one key block: delta comes from the tile
          acc_t sum = 0;
          const scalar_t* gi = dorow + i * dos.s[2];
          const scalar_t* oi = orow + i * os.s[2];
          for (int64_t c = 0; c < D; ++c)
            sum += static_cast<acc_t>(gi[c * dos.s[3]]) * static_cast<acc_t>(oi[c * os.s[3]]);
          delta[i] = sum;
        }
        P.drop.row_words(pair * Lq + i0, m, words.data());
        for (int64_t kb = 0; kb < TK; ++kb) {
          const int8_t st = P.block(b, kb);
          if (st == BLOCK_NONE) continue;
          const int64_t j0 = kb * BN, n = std::min(BN, Lk - j0);
          const acc_t* kj = kp + j0 * ldk;
          gemm_rm<acc_t>(false, true, m, n, D, scale, qp, ldq, kj, ldk, acc_t(0), S.data(), BN);
          gemm_rm<acc_t>(false, true, m, n, D, acc_t(1), dop, lddo, vp + j0 * ldv, ldv, acc_t(0),
                         dS.data(), BN);
          for (int64_t i = 0; i < m; ++i) {
            acc_t* p = S.data() + i * BN;
            acc_t* ds = dS.data() + i * BN;
            const acc_t mi = rmax[i], li = rsum[i];
            if (!std::isfinite(mi) || !(li > acc_t(0))) {  // the row sees no key: nothing flows
              std::fill(p, p + n, acc_t(0));
              std::fill(ds, ds + n, acc_t(0));
              continue;
            }
            const acc_t inv_l = acc_t(1) / li;
            if (st == BLOCK_PARTIAL) row_mask(p, P.valid + b * Lk + j0, n);
            if (TK == 1) {
              row_grad_whole(p, ds, frow.data(), n, mi, inv_l, P.drop.on, words[i], P.drop, inv_keep);
            } else {
              row_grad_split(p, ds, n, mi, inv_l, delta[i], P.drop.on, words[i], j0, P.drop, inv_keep);
            }
          }
          gemm_rm<acc_t>(true, false, n, D, m, acc_t(1), S.data(), BN, dop, lddo, acc_t(1),
                         dv.data() + j0 * D, D);
          gemm_rm<acc_t>(true, false, n, D, m, scale, dS.data(), BN, qp, ldq, acc_t(1),
                         dk.data() + j0 * D, D);
          gemm_rm<acc_t>(false, false, m, D, n, scale, dS.data(), BN, kj, ldk, acc_t(1),
                         dq.data() + i0 * D, D);
        }
      }
      scalar_t* gq = dQ + pair * Lq * D;
      scalar_t* gk = dK + pair * Lk * D;
      scalar_t* gv = dV + pair * Lk * D;
      for (int64_t t = 0; t < Lq * D; ++t) gq[t] = static_cast<scalar_t>(dq[t]);
      for (int64_t t = 0; t < Lk * D; ++t) {
        gk[t] = static_cast<scalar_t>(dk[t]);
        gv[t] = static_cast<scalar_t>(dv[t]);
      }
    }
  });
}

// ----------------------------------------------------------------------------- setup

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* fn) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, fn,
              ": q, k, v must be 4-D [B, H, L, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), fn,
              ": q, k, v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), fn,
              ": q, k, v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, fn,
              ": dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(k.sizes() == v.sizes(), fn, ": k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), fn,
              ": k/v shape ", k.sizes(), " does not match q ", q.sizes(), " ([B, H, Lk, D])");
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k,
                     const c10::optional<at::Tensor>& key_padding_mask,
                     const c10::optional<at::Tensor>& seed, double dropout_p, at::Tensor& mask_keep,
                     const char* fn) {
  Problem P;
  P.B = q.size(0);
  P.H = q.size(1);
  P.Lq = q.size(2);
  P.Lk = k.size(2);
  P.D = q.size(3);
  P.BN = block_n(P.Lk);
  P.TK = ceil_div(P.Lk, P.BN);
  P.BM = block_m(P.Lq);
  P.TQ = ceil_div(P.Lq, P.BM);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu(), fn, ": key_padding_mask must be a CPU tensor");
    TORCH_CHECK(m.scalar_type() == at::kBool, fn,
                ": key_padding_mask must be bool (True = attend), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == P.B && m.size(1) == P.Lk, fn,
                ": key_padding_mask must have shape [B, Lk] = [", P.B, ", ", P.Lk, "], got ", m.sizes());
    mask_keep = m.contiguous();
    P.valid = mask_keep.data_ptr<bool>();
    P.blocks.assign(P.B * P.TK, BLOCK_ALL);
    for (int64_t b = 0; b < P.B; ++b) {
      for (int64_t kb = 0; kb < P.TK; ++kb) {
        const int64_t j0 = kb * P.BN, j1 = std::min(P.Lk, j0 + P.BN);
        int64_t cnt = 0;
        for (int64_t j = j0; j < j1; ++j) cnt += P.valid[b * P.Lk + j] ? 1 : 0;
        P.blocks[b * P.TK + kb] = cnt == 0 ? BLOCK_NONE : (cnt == j1 - j0 ? BLOCK_ALL : BLOCK_PARTIAL);
      }
    }
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must lie in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined(), fn, ": dropout_p > 0 needs a seed");
    const at::Tensor& s = *seed;
    TORCH_CHECK(s.device().is_cpu(), fn, ": seed must be a CPU tensor");
    TORCH_CHECK(!s.is_floating_point() && s.scalar_type() != at::kBool && s.numel() == 2, fn,
                ": seed must be an integer tensor of 2 elements, got ", s.scalar_type(), " ", s.sizes());
    const at::Tensor sc = s.to(at::kLong).contiguous();
    const int64_t* sp = sc.data_ptr<int64_t>();
    P.drop.on = true;
    P.drop.s0 = uint32_t(uint64_t(sp[0]));
    P.drop.s1 = uint32_t(uint64_t(sp[1]));
    const double t = std::floor(dropout_p * 4294967296.0);
    P.drop.thr = t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
    P.drop.inv_keep = 1.0 / (1.0 - dropout_p);
  }
  return P;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cross_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& key_padding_mask,
                    const c10::optional<at::Tensor>& seed, double scale, double dropout_p) {
  const char* fn = "cross_attention_fwd";
  check_qkv(q, k, v, fn);
  at::Tensor mask_keep;
  const Problem P = make_problem(q, k, key_padding_mask, seed, dropout_p, mask_keep, fn);
  const auto st = q.scalar_type();
  const auto ct = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({P.B, P.H, P.Lq, P.D}, q.options());
  at::Tensor lse = at::empty({P.B, P.H, P.Lq}, q.options().dtype(ct));
  at::Tensor row_max = at::empty({P.B, P.H, P.Lq}, q.options().dtype(ct));
  at::Tensor row_sum = at::empty({P.B, P.H, P.Lq}, q.options().dtype(ct));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    row_max.fill_(-std::numeric_limits<double>::infinity());
    row_sum.zero_();
    return {out, lse, row_max, row_sum};
  }
  const Strides qs(q), ks(k), vs(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "cross_attention_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    fwd_kernel<scalar_t, acc_t>(P, q.const_data_ptr<scalar_t>(), qs, k.const_data_ptr<scalar_t>(), ks,
                                v.const_data_ptr<scalar_t>(), vs, out.data_ptr<scalar_t>(),
                                lse.data_ptr<acc_t>(), row_max.data_ptr<acc_t>(),
                                row_sum.data_ptr<acc_t>(), static_cast<acc_t>(scale));
  });
  return {out, lse, row_max, row_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
cross_attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& row_max, const at::Tensor& row_sum,
                    const at::Tensor& dout, const c10::optional<at::Tensor>& key_padding_mask,
                    const c10::optional<at::Tensor>& seed, double scale, double dropout_p) {
  const char* fn = "cross_attention_bwd";
  check_qkv(q, k, v, fn);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), fn,
              ": out and dout must have q's shape ", q.sizes(), ", got ", out.sizes(), " and ",
              dout.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(), fn,
              ": out and dout must have q's dtype ", q.scalar_type(), ", got ", out.scalar_type(),
              " and ", dout.scalar_type());
  const at::IntArrayRef rows = q.sizes().slice(0, 3);
  TORCH_CHECK(row_max.sizes() == rows && row_sum.sizes() == rows, fn,
              ": row_max and row_sum must have shape [B, H, Lq] = ", rows, ", got ", row_max.sizes(),
              " and ", row_sum.sizes());
  TORCH_CHECK(out.device().is_cpu() && dout.device().is_cpu() && row_max.device().is_cpu() &&
                  row_sum.device().is_cpu(),
              fn, ": out, dout, row_max, row_sum must be CPU tensors");
  at::Tensor mask_keep;
  const Problem P = make_problem(q, k, key_padding_mask, seed, dropout_p, mask_keep, fn);
  const auto st = q.scalar_type();
  const auto ct = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dq = at::empty({P.B, P.H, P.Lq, P.D}, q.options());
  at::Tensor dk = at::empty({P.B, P.H, P.Lk, P.D}, k.options());
  at::Tensor dv = at::empty({P.B, P.H, P.Lk, P.D}, v.options());
  if (dq.numel() == 0 || dk.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor mc = row_max.to(ct).contiguous(), sc = row_sum.to(ct).contiguous();
  const Strides qs(q), ks(k), vs(v), os(out), dos(dout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "cross_attention_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    bwd_kernel<scalar_t, acc_t>(P, q.const_data_ptr<scalar_t>(), qs, k.const_data_ptr<scalar_t>(), ks,
                                v.const_data_ptr<scalar_t>(), vs, out.const_data_ptr<scalar_t>(), os,
                                dout.const_data_ptr<scalar_t>(), dos, mc.const_data_ptr<acc_t>(),
                                sc.const_data_ptr<acc_t>(),
                                dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                dv.data_ptr<scalar_t>(), static_cast<acc_t>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace mmkernels
