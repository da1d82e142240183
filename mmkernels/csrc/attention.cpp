// mmkernels: blockwise (flash-style) multimodal masked attention on the CPU.
//
// The mask is never materialised: it is described by O(B*S) per-token metadata (modality,
// segment, position, run id) and a small rule table (see mmkernels/attention/mask.py).
// Queries are processed in blocks of BM rows and keys in blocks of BN columns. Before the
// main loops each (batch, query block, key block) tile is classified from per-block
// summaries (min/max of segment, position and run ids and the set of modalities present):
// EMPTY tiles are skipped, FULL tiles need no per-element test, PARTIAL tiles evaluate the
// rule per element. The classification is conservative (EMPTY/FULL only when certain).
//
// Forward: parallel over (batch, query head, query block); per key block S = scale * Q K^T
// goes through BLAS into a BM x BN buffer, masked entries become -inf, and an online softmax
// (running max / sum, fp32 or fp64) accumulates P V into a BM x D accumulator.
// The forward saves each row's max m and sum l = sum_j exp(S_j - m) apart, and the backward
// recomputes P = exp(S - m) / l from them: one rounded lse = m + log(l) would turn ulp(lse) into a
// relative error of every P at large scores.
// Backward: D = rowsum(dout * out); P is recomputed from (m, l), dS = P * (dP - D). When there are
// at least two (batch, kv head) pairs per thread, one pass parallel over those pairs computes
// dq, dk and dv (5 GEMMs per tile; the pair owns dk/dv and the dq of its query heads). Otherwise
// two passes: dq parallel over (batch, query head, query block), then dk/dv parallel over
// (batch, kv head, key block), looping over the group's query heads (GQA) and the query blocks.
// Either way every output block has exactly one writer (no races, no atomics).
// GEMMs: the Fortran sgemm_/dgemm_ exported by torch's CPU library (weak symbols), else ATen.
// bf16/fp16 inputs are converted to float32 once (O(B*H*S*D)); float64 stays float64.

#include "attention.h"
#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace mmkernels {
namespace {

constexpr int64_t BM = 64;  // query rows per block
constexpr int64_t BN = 64;  // keys per block

constexpr int8_t TILE_EMPTY = 0;
constexpr int8_t TILE_FULL = 1;
constexpr int8_t TILE_PARTIAL = 2;

constexpr int32_t RULE_BLOCKED = 0;
constexpr int32_t RULE_FULL = 1;
constexpr int32_t RULE_CAUSAL = 2;
constexpr int32_t RULE_SPAN = 3;

using namespace cpu_math;  // ceil_div, gemm_rm, the softmax row loops (row_max, row_exp_sum, row_grad)

// ----------------------------------------------------------------------------- the mask

// Per-block summary of one side's metadata (only in-bounds tokens count).
struct BlockSummary {
  bool any_valid = false;   // some token has seg >= 0
  bool all_valid = true;    // every token has seg >= 0
  int32_t vseg_min = std::numeric_limits<int32_t>::max(), vseg_max = -1;  // over valid tokens
  int32_t seg_min = std::numeric_limits<int32_t>::max(), seg_max = std::numeric_limits<int32_t>::min();
  int32_t pos_min = std::numeric_limits<int32_t>::max(), pos_max = std::numeric_limits<int32_t>::min();
  int32_t run_min = std::numeric_limits<int32_t>::max(), run_max = std::numeric_limits<int32_t>::min();
  std::vector<int32_t> mods;  // modalities present
};

struct Mask {
  bool has_mask = false;
  int64_t B = 0, Sq = 0, Sk = 0, NM = 0;
  const int32_t *q_mod = nullptr, *k_mod = nullptr, *q_seg = nullptr, *k_seg = nullptr;
  const int32_t *q_pos = nullptr, *k_pos = nullptr, *q_run = nullptr, *k_run = nullptr;
  const int32_t* rules = nullptr;  // [NM, NM]
  std::vector<at::Tensor> keep;     // owners of the (contiguous, int32) metadata
  int64_t TQ = 0, TK = 0;
  std::vector<int8_t> tiles;        // [B, TQ, TK]

  int8_t tile(int64_t b, int64_t qb, int64_t kb) const {
    return has_mask ? tiles[(b * TQ + qb) * TK + kb] : TILE_FULL;
  }

  // Exact visibility of key j for query i of sample b.
  bool visible(int64_t b, int64_t i, int64_t j) const {
    const int64_t qi = b * Sq + i, kj = b * Sk + j;
    const int32_t qs = q_seg[qi];
    if (qs < 0 || qs != k_seg[kj]) return false;
    switch (rules[int64_t(q_mod[qi]) * NM + k_mod[kj]]) {
      case RULE_FULL: return true;
      case RULE_CAUSAL: return k_pos[kj] <= q_pos[qi];
      case RULE_SPAN: return k_pos[kj] <= q_pos[qi] || k_run[kj] == q_run[qi];
      default: return false;
    }
  }
};

BlockSummary summarise(const int32_t* mod, const int32_t* seg, const int32_t* pos,
                       const int32_t* run, int64_t lo, int64_t hi, int64_t nm,
                       std::vector<char>& seen) {
  BlockSummary s;
  std::fill(seen.begin(), seen.end(), 0);
  for (int64_t t = lo; t < hi; ++t) {
    const int32_t g = seg[t];
    if (g >= 0) {
      s.any_valid = true;
      s.vseg_min = std::min(s.vseg_min, g);
      s.vseg_max = std::max(s.vseg_max, g);
    } else {
      s.all_valid = false;
    }
    s.seg_min = std::min(s.seg_min, g);
    s.seg_max = std::max(s.seg_max, g);
    s.pos_min = std::min(s.pos_min, pos[t]);
    s.pos_max = std::max(s.pos_max, pos[t]);
    s.run_min = std::min(s.run_min, run[t]);
    s.run_max = std::max(s.run_max, run[t]);
    const int32_t m = mod[t];
    TORCH_CHECK(m >= 0 && m < nm, "attention: modality id ", m, " outside the rule table [0, ", nm, ")");
    if (!seen[m]) {
      seen[m] = 1;
      s.mods.push_back(m);
    }
  }
  return s;
}

int8_t classify(const BlockSummary& q, const BlockSummary& k, const int32_t* rules, int64_t nm) {
  if (!q.any_valid || !k.any_valid || q.vseg_max < k.vseg_min || k.vseg_max < q.vseg_min)
    return TILE_EMPTY;
  const bool runs_overlap = !(q.run_max < k.run_min || k.run_max < q.run_min);
  const bool some_causal = k.pos_min <= q.pos_max;   // some pair has k_pos <= q_pos
  const bool all_causal = k.pos_max <= q.pos_min;    // every pair has k_pos <= q_pos
  const bool one_run = q.run_min == q.run_max && k.run_min == k.run_max && q.run_min == k.run_min;
  bool possible = false, certain = true;
  for (int32_t a : q.mods) {
    for (int32_t c : k.mods) {
      switch (rules[int64_t(a) * nm + c]) {
        case RULE_FULL: possible = true; break;
        case RULE_CAUSAL:
          possible = possible || some_causal;
          certain = certain && all_causal;
          break;
        case RULE_SPAN:
          possible = possible || some_causal || runs_overlap;
          certain = certain && (all_causal || one_run);
          break;
        default: certain = false; break;
      }
    }
  }
  if (!possible) return TILE_EMPTY;
  const bool one_segment = q.all_valid && k.all_valid && q.seg_min == q.seg_max &&
                           k.seg_min == k.seg_max && q.seg_min == k.seg_min;
  return (certain && one_segment) ? TILE_FULL : TILE_PARTIAL;
}

Mask make_mask(const std::vector<at::Tensor>& meta, int64_t B, int64_t Sq, int64_t Sk) {
  Mask mk;
  mk.B = B;
  mk.Sq = Sq;
  mk.Sk = Sk;
  mk.TQ = ceil_div(Sq, BM);
  mk.TK = ceil_div(Sk, BN);
  if (meta.empty()) return mk;
  TORCH_CHECK(meta.size() == 9, "attention: meta must be [] or the 9 tensors [q_mod, k_mod, q_seg, "
              "k_seg, q_pos, k_pos, q_run, k_run, rules], got ", meta.size());
  static const char* names[8] = {"q_mod", "k_mod", "q_seg", "k_seg", "q_pos", "k_pos", "q_run", "k_run"};
  const int32_t* ptrs[8];
  for (int i = 0; i < 8; ++i) {
    const at::Tensor& t = meta[i];
    const int64_t len = (i % 2 == 0) ? Sq : Sk;
    TORCH_CHECK(t.device().is_cpu(), "attention: ", names[i], " must be a CPU tensor");
    TORCH_CHECK(!t.is_floating_point() && t.scalar_type() != at::kBool,
                "attention: ", names[i], " must be an integer tensor, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == len, "attention: ", names[i],
                " must have shape [", B, ", ", len, "], got ", t.sizes());
    at::Tensor c = t.to(at::kInt).contiguous();
    mk.keep.push_back(c);
    ptrs[i] = c.data_ptr<int32_t>();
  }
  mk.q_mod = ptrs[0]; mk.k_mod = ptrs[1]; mk.q_seg = ptrs[2]; mk.k_seg = ptrs[3];
  mk.q_pos = ptrs[4]; mk.k_pos = ptrs[5]; mk.q_run = ptrs[6]; mk.k_run = ptrs[7];
  const at::Tensor& r = meta[8];
  TORCH_CHECK(r.device().is_cpu() && r.dim() == 2 && r.size(0) == r.size(1) && r.size(0) >= 1 &&
              !r.is_floating_point(), "attention: rules must be an integer CPU [NM, NM] table, got ",
              r.sizes());
  at::Tensor rc = r.to(at::kInt).contiguous();
  mk.keep.push_back(rc);
  mk.rules = rc.data_ptr<int32_t>();
  mk.NM = r.size(0);
  for (int64_t i = 0; i < mk.NM * mk.NM; ++i)
    TORCH_CHECK(mk.rules[i] >= RULE_BLOCKED && mk.rules[i] <= RULE_SPAN,
                "attention: rules entries must be 0..3, got ", mk.rules[i]);
  mk.has_mask = true;

  // Per-block summaries, then the tile map (O(B * TQ * TK * pairs of modalities)).
  std::vector<BlockSummary> qs(B * mk.TQ), ks(B * mk.TK);
  std::vector<char> seen(mk.NM);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < mk.TQ; ++t)
      qs[b * mk.TQ + t] = summarise(mk.q_mod, mk.q_seg, mk.q_pos, mk.q_run, b * Sq + t * BM,
                                    b * Sq + std::min(Sq, (t + 1) * BM), mk.NM, seen);
    for (int64_t t = 0; t < mk.TK; ++t)
      ks[b * mk.TK + t] = summarise(mk.k_mod, mk.k_seg, mk.k_pos, mk.k_run, b * Sk + t * BN,
                                    b * Sk + std::min(Sk, (t + 1) * BN), mk.NM, seen);
  }
  mk.tiles.resize(B * mk.TQ * mk.TK);
  at::parallel_for(0, B * mk.TQ, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bq = lo; bq < hi; ++bq) {
      const int64_t b = bq / mk.TQ;
      for (int64_t kb = 0; kb < mk.TK; ++kb)
        mk.tiles[bq * mk.TK + kb] = classify(qs[bq], ks[b * mk.TK + kb], mk.rules, mk.NM);
    }
  });
  return mk;
}

// Set masked entries of a PARTIAL tile's score block to -inf.
template <typename T>
void apply_mask(const Mask& mk, int64_t b, int64_t i0, int64_t m, int64_t j0, int64_t n, T* S) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (!mk.visible(b, i0 + i, j0 + j)) S[i * BN + j] = ninf;
}

// ----------------------------------------------------------------------------- shapes

struct Dims {
  int64_t B, Hq, Hkv, Sq, Sk, D, group;
};

Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention: q, k, v must be 4-D [B, H, S, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention: q, k, v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must have the same dtype");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "attention: dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k and v must have the same shape");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 1};
  TORCH_CHECK(k.size(0) == d.B && k.size(3) == d.D, "attention: k/v shape ", k.sizes(),
              " does not match q ", q.sizes());
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "attention: Hq (", d.Hq, ") must be a multiple of Hkv (",
              d.Hkv, ")");
  d.group = d.Hq / d.Hkv;
  return d;
}

inline at::ScalarType compute_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// ----------------------------------------------------------------------------- forward

template <typename T>
void fwd_kernel(const T* Q, const T* K, const T* V, T* O, T* L, T* Mx, T* Sm, const Dims& d, const Mask& mk,
                T scale) {
  const int64_t D = d.D, TQ = mk.TQ, TK = mk.TK;
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, d.B * d.Hq * TQ, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> S(BM * BN, T(0)), acc(BM * D), mrow(BM), lrow(BM), alpha(BM);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t qb = task % TQ, bh = task / TQ, h = bh % d.Hq, b = bh / d.Hq;
      const int64_t hk = h / d.group;
      const int64_t i0 = qb * BM, m = std::min(BM, d.Sq - i0);
      const T* q = Q + ((b * d.Hq + h) * d.Sq + i0) * D;
      const T* kh = K + (b * d.Hkv + hk) * d.Sk * D;
      const T* vh = V + (b * d.Hkv + hk) * d.Sk * D;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(mrow.begin(), mrow.end(), ninf);
      std::fill(lrow.begin(), lrow.end(), T(0));
      for (int64_t kb = 0; kb < TK; ++kb) {
        const int8_t cls = mk.tile(b, qb, kb);
        if (cls == TILE_EMPTY) continue;
        const int64_t j0 = kb * BN, n = std::min(BN, d.Sk - j0);
        gemm_rm<T>(false, true, m, n, D, scale, q, D, kh + j0 * D, D, T(0), S.data(), BN);
        if (cls == TILE_PARTIAL) apply_mask<T>(mk, b, i0, m, j0, n, S.data());
        for (int64_t i = 0; i < m; ++i) {
          T* s = S.data() + i * BN;
          const T mx = row_max(s, n, mrow[i]);
          if (mx == ninf) {  // nothing visible so far: contributes nothing
            for (int64_t j = 0; j < n; ++j) s[j] = T(0);
            alpha[i] = T(1);
            continue;
          }
          const T sum = row_exp_sum(s, n, mx);
          const T a = std::exp(mrow[i] - mx);  // 0 when mrow was -inf
          alpha[i] = a;
          lrow[i] = lrow[i] * a + sum;
          mrow[i] = mx;
          if (a != T(1)) {
            T* ac = acc.data() + i * D;
            for (int64_t c = 0; c < D; ++c) ac[c] *= a;
          }
        }
        gemm_rm<T>(false, false, m, D, n, T(1), S.data(), BN, vh + j0 * D, D, T(1), acc.data(), D);
      }
      T* o = O + ((b * d.Hq + h) * d.Sq + i0) * D;
      const int64_t roff = (b * d.Hq + h) * d.Sq + i0;
      T* l = L + roff;
      for (int64_t i = 0; i < m; ++i) {
        Mx[roff + i] = mrow[i];
        Sm[roff + i] = lrow[i];
        if (lrow[i] > T(0)) {
          const T inv = T(1) / lrow[i];
          for (int64_t c = 0; c < D; ++c) o[i * D + c] = acc[i * D + c] * inv;
          l[i] = mrow[i] + std::log(lrow[i]);
        } else {
          for (int64_t c = 0; c < D; ++c) o[i * D + c] = T(0);
          l[i] = ninf;
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward

// For one tile: P = exp(scale * q k^T - mx) / sm (masked, 0 for rows with sm = 0, which saw no
// key) into P, and dS = P * (dout v^T - Drow) into dS. Both BM x BN buffers (ld BN).
template <typename T>
inline void tile_grads(const Mask& mk, int8_t cls, int64_t b, int64_t i0, int64_t m, int64_t j0,
                       int64_t n, int64_t D, T scale, const T* q, const T* k, const T* v,
                       const T* dout, const T* mx, const T* sm, const T* Drow, T* P, T* dS) {
  gemm_rm<T>(false, true, m, n, D, scale, q, D, k, D, T(0), P, BN);
  if (cls == TILE_PARTIAL) apply_mask<T>(mk, b, i0, m, j0, n, P);
  gemm_rm<T>(false, true, m, n, D, T(1), dout, D, v, D, T(0), dS, BN);
  for (int64_t i = 0; i < m; ++i) {
    T* p = P + i * BN;
    T* ds = dS + i * BN;
    if (!(sm[i] > T(0))) {
      for (int64_t j = 0; j < n; ++j) { p[j] = T(0); ds[j] = T(0); }
      continue;
    }
    row_grad_norm(p, ds, n, mx[i], T(1) / sm[i], Drow[i]);
  }
}

// dst[j * BM + i] = src[i * BN + j] for i < m, j < n (so that P^T / dS^T feed plain GEMMs).
template <typename T>
inline void transpose_tile(const T* src, int64_t m, int64_t n, T* dst) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) dst[j * BM + i] = src[i * BN + j];
}

// The BM x BN tiles of one task: P, dS and their transposes.
template <typename T>
struct KeyBlockScratch {
  std::vector<T> P = std::vector<T>(BM * BN, T(0)), dS = std::vector<T>(BM * BN, T(0));
  std::vector<T> Pt = std::vector<T>(BM * BN, T(0)), dSt = std::vector<T>(BM * BN, T(0));
};

// Accumulates dk and dv of key block kb of (batch b, kv head hk) over every non-empty tile of the
// group's query heads, and, when dQ is not null, the tiles' dq terms too (the caller then owns
// dq of those query heads).
template <typename T>
void key_block_grads(const T* Q, const T* K, const T* V, const T* dO, const T* Mx, const T* Sm, const T* Dr,
                     T* dQ,
                     T* dK, T* dV, const Dims& d, const Mask& mk, T scale, int64_t b, int64_t hk,
                     int64_t kb, KeyBlockScratch<T>& w) {
  const int64_t D = d.D;
  const int64_t j0 = kb * BN, n = std::min(BN, d.Sk - j0);
  const int64_t kvoff = (b * d.Hkv + hk) * d.Sk + j0;
  const T* k = K + kvoff * D;
  const T* v = V + kvoff * D;
  T* dk = dK + kvoff * D;
  T* dv = dV + kvoff * D;
  for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
    for (int64_t qb = 0; qb < mk.TQ; ++qb) {
      const int8_t cls = mk.tile(b, qb, kb);
      if (cls == TILE_EMPTY) continue;
      const int64_t i0 = qb * BM, m = std::min(BM, d.Sq - i0);
      const int64_t qoff = ((b * d.Hq + h) * d.Sq + i0);
      const T* q = Q + qoff * D;
      const T* dout = dO + qoff * D;
      tile_grads<T>(mk, cls, b, i0, m, j0, n, D, scale, q, k, v, dout, Mx + qoff, Sm + qoff, Dr + qoff,
                    w.P.data(), w.dS.data());
      transpose_tile(w.P.data(), m, n, w.Pt.data());
      transpose_tile(w.dS.data(), m, n, w.dSt.data());
      gemm_rm<T>(false, false, n, D, m, T(1), w.Pt.data(), BM, dout, D, T(1), dv, D);
      gemm_rm<T>(false, false, n, D, m, scale, w.dSt.data(), BM, q, D, T(1), dk, D);
      if (dQ != nullptr)
        gemm_rm<T>(false, false, m, D, n, scale, w.dS.data(), BN, k, D, T(1), dQ + qoff * D, D);
    }
  }
}

template <typename T>
void bwd_kernel(const T* Q, const T* K, const T* V, const T* dO, const T* Mx, const T* Sm, const T* Dr, T* dQ,
                T* dK, T* dV, const Dims& d, const Mask& mk, T scale) {
  const int64_t D = d.D, TQ = mk.TQ, TK = mk.TK;
  if (d.B * d.Hkv >= 2 * int64_t(at::get_num_threads())) {
    // Enough (batch, kv head) pairs to keep every thread busy: one pass, one task per pair, which
    // owns dk/dv of its kv head and dq of the group's query heads (5 GEMMs per tile, one exp).
    at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t lo, int64_t hi) {
      KeyBlockScratch<T> w;
      for (int64_t bh = lo; bh < hi; ++bh)
        for (int64_t kb = 0; kb < TK; ++kb)
          key_block_grads<T>(Q, K, V, dO, Mx, Sm, Dr, dQ, dK, dV, d, mk, scale, bh / d.Hkv, bh % d.Hkv, kb,
                             w);
    });
    return;
  }
  // Otherwise two passes. dq: one writer per (b, h, query block).
  at::parallel_for(0, d.B * d.Hq * TQ, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> P(BM * BN, T(0)), dS(BM * BN, T(0));
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t qb = task % TQ, bh = task / TQ, h = bh % d.Hq, b = bh / d.Hq;
      const int64_t hk = h / d.group;
      const int64_t i0 = qb * BM, m = std::min(BM, d.Sq - i0);
      const int64_t qoff = ((b * d.Hq + h) * d.Sq + i0);
      const int64_t kvoff = (b * d.Hkv + hk) * d.Sk;
      T* dq = dQ + qoff * D;
      for (int64_t kb = 0; kb < TK; ++kb) {
        const int8_t cls = mk.tile(b, qb, kb);
        if (cls == TILE_EMPTY) continue;
        const int64_t j0 = kb * BN, n = std::min(BN, d.Sk - j0);
        const T* k = K + (kvoff + j0) * D;
        tile_grads<T>(mk, cls, b, i0, m, j0, n, D, scale, Q + qoff * D, k, V + (kvoff + j0) * D,
                      dO + qoff * D, Mx + qoff, Sm + qoff, Dr + qoff, P.data(), dS.data());
        gemm_rm<T>(false, false, m, D, n, scale, dS.data(), BN, k, D, T(1), dq, D);
      }
    }
  });
  // dk, dv: one writer per (b, kv head, key block); sums over the group's query heads.
  at::parallel_for(0, d.B * d.Hkv * TK, 1, [&](int64_t lo, int64_t hi) {
    KeyBlockScratch<T> w;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t kb = task % TK, bh = task / TK;
      key_block_grads<T>(Q, K, V, dO, Mx, Sm, Dr, nullptr, dK, dV, d, mk, scale, bh / d.Hkv, bh % d.Hkv,
                         kb, w);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::vector<at::Tensor>& meta, double scale) {
  const Dims d = check_qkv(q, k, v);
  const Mask mk = make_mask(meta, d.B, d.Sq, d.Sk);
  const auto ct = compute_type(q.scalar_type());
  const at::Tensor qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  at::Tensor out = at::empty({d.B, d.Hq, d.Sq, d.D}, q.options().dtype(ct));
  at::Tensor lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(ct));
  at::Tensor row_max = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(ct));
  at::Tensor row_sum = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(ct));
  if (ct == at::kDouble) {
    fwd_kernel<double>(qc.data_ptr<double>(), kc.data_ptr<double>(), vc.data_ptr<double>(),
                       out.data_ptr<double>(), lse.data_ptr<double>(), row_max.data_ptr<double>(),
                       row_sum.data_ptr<double>(), d, mk, scale);
  } else {
    fwd_kernel<float>(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                      out.data_ptr<float>(), lse.data_ptr<float>(), row_max.data_ptr<float>(),
                      row_sum.data_ptr<float>(), d, mk, static_cast<float>(scale));
  }
  return {out.to(q.scalar_type()), lse, row_max, row_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& row_max, const at::Tensor& row_sum, const at::Tensor& dout,
              const std::vector<at::Tensor>& meta, double scale) {
  const Dims d = check_qkv(q, k, v);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(),
              "attention_bwd: out and dout must have q's shape ", q.sizes(), ", got ", out.sizes(),
              " and ", dout.sizes());
  const std::vector<int64_t> row_shape{d.B, d.Hq, d.Sq};
  TORCH_CHECK(row_max.sizes() == row_shape && row_sum.sizes() == row_shape,
              "attention_bwd: row_max and row_sum must have shape [B, Hq, Sq] = ", row_shape, ", got ",
              row_max.sizes(), " and ", row_sum.sizes());
  TORCH_CHECK(out.device().is_cpu() && dout.device().is_cpu() && row_max.device().is_cpu() &&
              row_sum.device().is_cpu(), "attention_bwd: out, dout, row_max, row_sum must be CPU tensors");
  const Mask mk = make_mask(meta, d.B, d.Sq, d.Sk);
  const auto ct = compute_type(q.scalar_type());
  const at::Tensor qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const at::Tensor doc = dout.to(ct).contiguous();
  const at::Tensor mc = row_max.to(ct).contiguous(), sc = row_sum.to(ct).contiguous();
  const at::Tensor Dr = (doc * out.to(ct)).sum(-1).contiguous();  // [B, Hq, Sq]
  at::Tensor dq = at::zeros({d.B, d.Hq, d.Sq, d.D}, q.options().dtype(ct));
  at::Tensor dk = at::zeros({d.B, d.Hkv, d.Sk, d.D}, q.options().dtype(ct));
  at::Tensor dv = at::zeros({d.B, d.Hkv, d.Sk, d.D}, q.options().dtype(ct));
  if (ct == at::kDouble) {
    bwd_kernel<double>(qc.data_ptr<double>(), kc.data_ptr<double>(), vc.data_ptr<double>(),
                       doc.data_ptr<double>(), mc.data_ptr<double>(), sc.data_ptr<double>(),
                       Dr.data_ptr<double>(),
                       dq.data_ptr<double>(), dk.data_ptr<double>(), dv.data_ptr<double>(), d, mk,
                       scale);
  } else {
    bwd_kernel<float>(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                      doc.data_ptr<float>(), mc.data_ptr<float>(), sc.data_ptr<float>(), Dr.data_ptr<float>(),
                      dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), d, mk,
                      static_cast<float>(scale));
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace mmkernels
