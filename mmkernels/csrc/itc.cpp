// mmkernels: the ALBEF / BLIP / BLIP-2 contrastive objectives (the itc unit) on the CPU: per-row
// losses against soft targets (forward), their gradients (backward) and Gumbel-max hard negatives.
//
// The N x M similarities are never materialised, and the extra memory does not grow with M: rows
// are processed in chunks of R rows and the keys in column tiles of C columns (R * C * tokens <=
// TILE floats, a buffer of 1 MiB per thread). The keys are segments, k and the queue kq (ALBEF's
// [feat_m; queue]), each used as it is stored: a tile is a row range of a segment's [rows * P, D]
// matrix, strided views included (queue.T of a [D, K] buffer), which BLAS multiplies directly; only
// a dtype conversion or a token layout that no 2-D view describes makes a copy. A tile's GEMM puts
// the chunk's query tokens (and, when the teacher's keys are the keys, the teacher's query tokens
// stacked under them: one GEMM for both) against the tile's key tokens into a float32 buffer;
// vectorised loops reduce it to the max over token pairs (with its arg-max in the backward) and
// then to per-row statistics: log-sum-exp, the positives' count and sum, the teacher's
// log-sum-exp and softmax-weighted sum of the logits, merged online across tiles (rescaled to the
// larger max). One query token against several key tokens (BLIP-2's text -> image) takes the
// products transposed, key tokens in rows, so that the max over a key's tokens is vectorised over
// the queries. The column tiles are split into one contiguous range per thread; each thread keeps
// its own row statistics (and dq partial sums), merged in range order, so results are
// deterministic. With a single range the GEMMs and loops are multithreaded instead.
// The backward recomputes a tile and forms scale * dL in place. With one token pair it feeds two
// GEMMs: dq_chunk += dL_tile @ k_tile and dk_tile += dL_tile^T @ q_chunk (each thread owns its
// tiles' dk rows). With several token pairs only the arg-max pair of each (i, j) gets a gradient,
// so it is gathered and scattered with D-length axpys instead of dense GEMMs over mostly zeros.
// bf16/fp16 inputs are converted to float32 (O((N + M) * D)), or multiplied with bf16 GEMMs when
// the caller asks (bf16_gemm); float64 inputs (gradcheck) take a plain ATen float64 version of a
// row-chunked algorithm. The exact contract is in mmkernels/contrastive/itc/ops.py.

#include "itc.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "contrastive_internal.h"

namespace mmkernels {
namespace {

using namespace contrastive_detail;

constexpr const char* kItc = "mmkernels itc";

// ---------------------------------------------------------------------------------------------
// Vector helpers.

// GCC compares a vector wider than the widest register lane by lane, and so it does a float
// comparison mask combined with | or & before it selects: the hot loops below compare 8 int64
// lanes at a time and feed each float comparison straight into a select.
static_assert(WL == 16, "the int64 comparisons below assume 16 float lanes");
typedef int64_t wl8 __attribute__((vector_size(8 * sizeof(int64_t))));

// The lanes j where ids[j] == id (a comparison mask of wi lanes).
CPU_MATH_INLINE wi equal_lanes(const int64_t* ids, int64_t id) {
  wl8 a, b;
  __builtin_memcpy(&a, ids, sizeof(a));
  __builtin_memcpy(&b, ids + 8, sizeof(b));
  const wl8 ma = a == (wl8{} + id), mb = b == (wl8{} + id);  // all-ones or zero int64 lanes
  return __builtin_shufflevector(vbits<wi>(ma), vbits<wi>(mb), 0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                                 20, 22, 24, 26, 28, 30);
}
// Whether any lane is NaN (once per row segment or block: lane by lane is fine).
CPU_MATH_INLINE bool any_nan(const wf& v) {
  bool r = false;
  for (int i = 0; i < WL; ++i) r |= v[i] != v[i];
  return r;
}
// The same for the first n (< WL) entries; the other lanes are false.
CPU_MATH_INLINE wi equal_lanes_n(const int64_t* ids, int64_t n, int64_t id) {
  int64_t t[WL];
  for (int i = 0; i < WL; ++i) t[i] = i < n ? ids[i] : ~id;
  return equal_lanes(t, id);
}

// ---------------------------------------------------------------------------------------------
// The max over token pairs (multiversioned hot loops).

// out[j] = max_{a < Q} x[a * ld + j] for j0 <= j < j1 and, when idx is given, idx[j] = the first
// maximal a (a later a wins only when strictly greater; a NaN wins, as torch.max).
CPU_MATH_INLINE void reduce_rows_scalar(const float* x, int64_t ld, int64_t Q, int64_t j0,
                                        int64_t j1, float* out, int32_t* idx) {
  for (int64_t j = j0; j < j1; ++j) {
    float best = x[j];
    int32_t arg = 0;
    for (int64_t a = 1; a < Q; ++a) {
      const float v = x[a * ld + j];
      if (v > best || (v != v && best == best)) {
        best = v;
        arg = static_cast<int32_t>(a);
      }
    }
    out[j] = best;
    if (idx) idx[j] = arg;
  }
}

// The same for j < n, out possibly x itself: vectorised over j, a block holding a NaN redone by
// the scalar loop (before anything of it is stored).
CPU_MATH_MULTIVERSION
void reduce_rows(const float* x, int64_t ld, int64_t Q, int64_t n, float* out, int32_t* idx) {
  int64_t j = 0;
  for (; j + WL <= n; j += WL) {
    wf best = vload<wf>(x + j);
    wf nan = best;  // NaN in the lanes where any candidate is NaN
    wi arg = wi{};
    for (int64_t a = 1; a < Q; ++a) {
      const wf v = vload<wf>(x + a * ld + j);
      const wi up = v > best;
      best = vsel(up, v, best);
      arg = vsel(up, wi{} + static_cast<int32_t>(a), arg);
      nan = vsel(v != v, v, nan);
    }
    if (any_nan(nan)) {
      reduce_rows_scalar(x, ld, Q, j, j + WL, out, idx);
      continue;
    }
    vstore(out + j, best);
    if (idx) __builtin_memcpy(idx + j, &arg, sizeof(arg));
  }
  reduce_rows_scalar(x, ld, Q, j, n, out, idx);
}

// Groups of P consecutive entries v[j * P + b], b < P, whose query token is ta[j * P + b] (0 when
// ta is null): out[j] = their max and, when idx is given, idx[j] = a * P + b of the first maximal
// pair in a * P + b order.
CPU_MATH_MULTIVERSION
void reduce_groups(const float* v, const int32_t* ta, int64_t P, int64_t n, float* out,
                   int32_t* idx) {
  if (!idx) {
    for (int64_t j = 0; j < n; ++j) {
      const float* g = v + j * P;
      float best = g[0];
      for (int64_t b = 1; b < P; ++b) best = nan_max(best, g[b]);
      out[j] = best;
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* g = v + j * P;
    const int32_t* ga = ta ? ta + j * P : nullptr;
    float best = g[0];
    int32_t ba = ga ? ga[0] : 0, bb = 0;
    for (int64_t b = 1; b < P; ++b) {
      const float x = g[b];
      const int32_t a = ga ? ga[b] : 0;
      if (x > best || (x == best && a < ba) || (x != x && best == best)) {
        best = x;
        ba = a;
        bb = static_cast<int32_t>(b);
      }
    }
    out[j] = best;
    idx[j] = ba * static_cast<int32_t>(P) + bb;
  }
}

// S[j] (and idx[j]) for the columns j0 <= j < j1 of one row of a chunk's products: prod_r points at
// the row's Q product rows [Q, M * P] (scratch afterwards: the first one is overwritten). ta:
// scratch for the query tokens' arg-max.
void reduce_tokens(float* prod_r, int64_t Q, int64_t M, int64_t P, int64_t j0, int64_t j1,
                   float* S, int32_t* idx, std::vector<int32_t>& ta) {
  const int64_t MP = M * P, n = j1 - j0;
  if (P == 1) {
    reduce_rows(prod_r + j0, MP, Q, n, S + j0, idx ? idx + j0 : nullptr);
    return;
  }
  float* v = prod_r + j0 * P;
  int32_t* a = nullptr;
  if (Q > 1) {
    if (idx) {
      ta.resize(static_cast<size_t>(n * P));
      a = ta.data();
    }
    reduce_rows(v, MP, Q, n * P, v, a);
  }
  reduce_groups(v, a, P, n, S + j0, idx ? idx + j0 : nullptr);
}

// ---------------------------------------------------------------------------------------------
// Row statistics (multiversioned hot loops).

// One row segment of the forward: the statistics of L = scale * S and, with a teacher, of
// TL = tscale * TS.
struct FwdPart {
  float max;     // max_j L (NaN if any is NaN)
  double sexp;   // sum_j exp(L - lse_shift(max))
  double sum;    // sum_j L
  double cnt;    // number of positives
  double pos;    // sum of L over the positives
  float tmax;    // max_j TL
  double tsexp;  // sum_j exp(TL - lse_shift(tmax))
  double tsw;    // sum_j exp(TL - lse_shift(tmax)) * L
};

// s holds S on entry and L on exit; ts (null without a teacher) TS on entry and TL on exit.
CPU_MATH_MULTIVERSION
FwdPart fwd_segment(float* s, float* ts, const int64_t* cid, int64_t rid, int64_t n, float scale,
                    float tscale) {
  const wf zero = vsplat<wf>(0.0f), one = vsplat<wf>(1.0f), ninf = vsplat<wf>(-kInf);
  FwdPart p{-kInf, 0.0, 0.0, 0.0, 0.0, -kInf, 0.0, 0.0};
  wf vmax = ninf, vtmax = ninf, vnan = zero, vtnan = zero;  // vnan, vtnan: NaN where one was
  int64_t j = 0;
  // Pass 1: logits in place, their max and sum, the positives; the teacher logits and their max.
  while (j < n) {
    wf acc = zero, cacc = zero, pacc = zero;
    const int64_t stop = std::min(n, j + FLUSH * WL);
    for (; j + WL <= stop; j += WL) {
      const wf l = logit(scale, vload<wf>(s + j));
      vstore(s + j, l);
      vmax = vsel(l > vmax, l, vmax);
      vnan = vsel(l != l, l, vnan);
      acc += l;
      const wi pos = equal_lanes(cid + j, rid);
      cacc += vsel(pos, one, zero);
      pacc += vsel(pos, l, zero);
      if (ts) {
        const wf tl = logit(tscale, vload<wf>(ts + j));
        vstore(ts + j, tl);
        vtmax = vsel(tl > vtmax, tl, vtmax);
        vtnan = vsel(tl != tl, tl, vtnan);
      }
    }
    if (j < stop) {  // tail of the row, fewer than WL elements
      const int64_t k = stop - j;
      const wi valid = vlanes_below<wf>(k);
      const wf l = logit(scale, vload_n<wf>(s + j, k, 0.0f));
      vstore_n(s + j, l, k);
      const wf lv = vsel(valid, l, ninf);
      vmax = vsel(lv > vmax, lv, vmax);
      vnan = vsel(lv != lv, lv, vnan);
      acc += vsel(valid, l, zero);
      const wi pos = equal_lanes_n(cid + j, k, rid);
      cacc += vsel(pos, one, zero);
      pacc += vsel(pos, l, zero);
      if (ts) {
        const wf tl = logit(tscale, vload_n<wf>(ts + j, k, 0.0f));
        vstore_n(ts + j, tl, k);
        const wf tv = vsel(valid, tl, ninf);
        vtmax = vsel(tv > vtmax, tv, vtmax);
        vtnan = vsel(tv != tv, tv, vtnan);
      }
      j = stop;
    }
    p.sum += vhsum(acc);
    p.cnt += vhsum(cacc);
    p.pos += vhsum(pacc);
  }
  p.max = any_nan(vnan) ? kNaN : vhmax_nan(vmax);
  p.tmax = !ts ? -kInf : any_nan(vtnan) ? kNaN : vhmax_nan(vtmax);

  // Pass 2: the sums of exponentials (and the teacher-weighted sum of the logits).
  const float shift = lse_shift(p.max), tshift = lse_shift(p.tmax);
  j = 0;
  while (j < n) {
    wf eacc = zero, tacc = zero, wacc = zero;
    const int64_t stop = std::min(n, j + FLUSH * WL);
    for (; j + WL <= stop; j += WL) {
      const wf l = vload<wf>(s + j);
      eacc += vexp(l - shift);
      if (ts) {
        const wf te = vexp(vload<wf>(ts + j) - tshift);
        tacc += te;
        wacc += te * l;
      }
    }
    if (j < stop) {  // padded lanes: exp(-inf) = 0, and they weigh a logit of 0
      const int64_t k = stop - j;
      eacc += vexp(vload_n<wf>(s + j, k, -kInf) - shift);
      if (ts) {
        const wf te = vexp(vload_n<wf>(ts + j, k, -kInf) - tshift);
        tacc += te;
        wacc += te * vload_n<wf>(s + j, k, 0.0f);
      }
      j = stop;
    }
    p.sexp += vhsum(eacc);
    p.tsexp += vhsum(tacc);
    p.tsw += vhsum(wacc);
  }
  if (p.max != p.max) p.sexp = static_cast<double>(kNaN);
  if (p.tmax != p.tmax) p.tsexp = static_cast<double>(kNaN);
  return p;
}

// The target's coefficients for one row: T_j = soft * exp(TL_j - tlse) + hard * pos_j + flat.
struct Targets {
  float soft;  // (1 - eps) * alpha
  float hard;  // (1 - eps) * (1 - alpha) / c (inf when c = 0: NaN targets, as the reference)
  float flat;  // eps / M
  bool use_soft, use_hard;
};

// Backward, one row segment: s holds S on entry and scale * dL on exit, dL_j = g * (exp(L_j - lse)
// - T_j); ts (null without a teacher) holds TS. Returns sum_j dL_j * S_j, accumulated in double.
CPU_MATH_MULTIVERSION
double bwd_segment(float* s, const float* ts, const int64_t* cid, int64_t rid, int64_t n,
                   float scale, float tscale, float lse, float tlse, float g, Targets t) {
  const wf zero = vsplat<wf>(0.0f), one = vsplat<wf>(1.0f);
  const bool soft = t.use_soft && ts, hard = t.use_hard;
  DoubleAcc acc;
  int64_t j = 0;
  for (; j + WL <= n; j += WL) {
    const wf sv = vload<wf>(s + j);
    wf T = vsplat<wf>(t.flat);
    if (soft) T += t.soft * vexp(logit(tscale, vload<wf>(ts + j)) - tlse);
    if (hard) T += vsel(equal_lanes(cid + j, rid), one, zero) * t.hard;
    const wf dl = g * (vexp(logit(scale, sv) - lse) - T);
    add_products(acc, dl, sv);
    vstore(s + j, dl * scale);
  }
  if (j < n) {  // tail, fewer than WL elements; padded lanes contribute 0
    const int64_t k = n - j;
    const wf sv = vload_n<wf>(s + j, k, 0.0f);
    wf T = vsplat<wf>(t.flat);
    if (soft) T += t.soft * vexp(logit(tscale, vload_n<wf>(ts + j, k, 0.0f)) - tlse);
    if (hard) T += vsel(equal_lanes_n(cid + j, k, rid), one, zero) * t.hard;
    const wf dl = vsel(vlanes_below<wf>(k), g * (vexp(logit(scale, sv) - lse) - T), zero);
    add_products(acc, dl, sv);
    vstore_n(s + j, dl * scale, k);
  }
  return total(acc);
}

// ---------------------------------------------------------------------------------------------
// Online merge of row statistics across column tiles.

// The statistics of no columns: the identity of merge_parts.
constexpr FwdPart kNoColumns{-kInf, 0.0, 0.0, 0.0, 0.0, -kInf, 0.0, 0.0};

// The factor that moves a sum of exponentials taken at lse_shift(max) to the shift `to`.
inline double shift_factor(float max, float to) {
  const float from = lse_shift(max);
  return from == to ? 1.0 : std::exp(static_cast<double>(from) - static_cast<double>(to));
}

// a := the statistics of a's columns followed by b's: the sums of exponentials (and the teacher's
// weighted sum) are rescaled to the larger max, the plain sums and counts add.
inline void merge_parts(FwdPart& a, const FwdPart& b) {
  const float m = nan_max(a.max, b.max), tm = nan_max(a.tmax, b.tmax);
  const float sh = lse_shift(m), tsh = lse_shift(tm);
  double se = 0.0, tse = 0.0, tsw = 0.0;
  for (const FwdPart* p : {static_cast<const FwdPart*>(&a), &b}) {
    if (p->sexp != 0.0) se += p->sexp * shift_factor(p->max, sh);
    if (p->tsexp != 0.0) {
      const double f = shift_factor(p->tmax, tsh);
      tse += p->tsexp * f;
      tsw += p->tsw * f;
    }
  }
  a.max = m;
  a.tmax = tm;
  a.sexp = se;
  a.tsexp = tse;
  a.tsw = tsw;
  a.sum += b.sum;
  a.cnt += b.cnt;
  a.pos += b.pos;
}

// ---------------------------------------------------------------------------------------------
// The token backward: the gradient of S_ij reaches only its arg-max token pair, so it is gathered
// and scattered with D-length axpys (multiversioned hot loops; bf16 rows are widened on load).

typedef uint16_t wh __attribute__((vector_size(WL * sizeof(uint16_t))));

CPU_MATH_INLINE wf load_row(const float* p) { return vload<wf>(p); }
CPU_MATH_INLINE wf load_row(const at::BFloat16* p) {
  wh h;
  __builtin_memcpy(&h, p, sizeof(h));
  const wu u = __builtin_convertvector(h, wu) << 16;
  wf f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// y[d] += a * x[d], d < n.
template <typename T>
CPU_MATH_INLINE void axpy(float* y, float a, const T* x, int64_t n) {
  const wf av = vsplat<wf>(a);
  int64_t d = 0;
  for (; d + WL <= n; d += WL) vstore(y + d, vload<wf>(y + d) + av * load_row(x + d));
  for (; d < n; ++d) y[d] += a * static_cast<float>(x[d]);
}

// One query row: dq_r[a*] += s[j] * k[j * P + b*] over the tile's columns j < c, (a*, b*) the
// arg-max pair idx[j] = a* * P + b*; key rows kr + row * kld, dq_r [Q, D] contiguous.
template <typename T>
CPU_MATH_INLINE void scatter_dq_impl(const float* s, const int32_t* idx, int64_t c, int64_t P,
                                     const T* kr, int64_t kld, float* dq_r, int64_t D) {
  for (int64_t j = 0; j < c; ++j) {
    const int64_t t = idx[j], a = t / P, b = t - a * P;
    axpy(dq_r + a * D, s[j], kr + (j * P + b) * kld, D);
  }
}
CPU_MATH_MULTIVERSION
void scatter_dq(const float* s, const int32_t* idx, int64_t c, int64_t P, const float* kr,
                int64_t kld, float* dq_r, int64_t D) {
  scatter_dq_impl(s, idx, c, P, kr, kld, dq_r, D);
}
CPU_MATH_MULTIVERSION
void scatter_dq(const float* s, const int32_t* idx, int64_t c, int64_t P, const at::BFloat16* kr,
                int64_t kld, float* dq_r, int64_t D) {
  scatter_dq_impl(s, idx, c, P, kr, kld, dq_r, D);
}

// One key column: dk_j[b*] += s[r * ls] * q[r * Q + a*] over the chunk's rows r < rc; query rows
// qr [rc * Q, D] contiguous, dk_j [P, D] contiguous.
template <typename T>
CPU_MATH_INLINE void scatter_dk_impl(const float* s, int64_t ls, const int32_t* idx, int64_t rc,
                                     int64_t Q, int64_t P, const T* qr, float* dk_j, int64_t D) {
  for (int64_t r = 0; r < rc; ++r) {
    const int64_t t = idx[r * ls], a = t / P, b = t - a * P;
    axpy(dk_j + b * D, s[r * ls], qr + (r * Q + a) * D, D);
  }
}
CPU_MATH_MULTIVERSION
void scatter_dk(const float* s, int64_t ls, const int32_t* idx, int64_t rc, int64_t Q, int64_t P,
                const float* qr, float* dk_j, int64_t D) {
  scatter_dk_impl(s, ls, idx, rc, Q, P, qr, dk_j, D);
}
CPU_MATH_MULTIVERSION
void scatter_dk(const float* s, int64_t ls, const int32_t* idx, int64_t rc, int64_t Q, int64_t P,
                const at::BFloat16* qr, float* dk_j, int64_t D) {
  scatter_dk_impl(s, ls, idx, rc, Q, P, qr, dk_j, D);
}

// ---------------------------------------------------------------------------------------------
// Inputs.

struct Inputs {
  int64_t N, M, D, Q, P;
  at::Tensor rid, cid;                  // contiguous int64 [N], [M]
  std::vector<at::Tensor> keys;         // k, then kq when given: the columns [k; kq]
  bool teacher;                         // alpha != 0
  at::Tensor tq;                        // the teacher queries, defined when teacher
  std::vector<at::Tensor> tkeys;        // the teacher keys: tk, or the keys when tk is absent
  bool tkeys_are_keys = true;
};

at::Tensor read_ids(const at::Tensor& ids, int64_t n, const char* name) {
  TORCH_CHECK(ids.defined() && ids.device().is_cpu(), kItc, " (cpu kernel): ", name,
              " must be a CPU tensor");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == n, kItc, ": ", name, " must have shape [", n,
              "], got ", ids.sizes());
  TORCH_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false), kItc, ": ", name,
              " must be an integer tensor, got ", ids.scalar_type());
  return to_contiguous(ids, at::kLong);
}

void check_tokens(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), kItc, ": ", name, " must be defined");
  TORCH_CHECK(x.device().is_cpu(), kItc, " (cpu kernel): ", name, " must be a CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 3, kItc, ": ", name, " must be 3-D [rows, tokens, D], got shape ",
              x.sizes());
  TORCH_CHECK(x.size(1) >= 1, kItc, ": ", name, " has no tokens: shape ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), kItc, ": unsupported dtype ", x.scalar_type(),
              " of ", name, " (float32, bfloat16, float16; float64 for gradcheck)");
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The features without autograd history: the kernels' ATen calls run on worker threads too, where
// the caller's dispatch state (below autograd) does not apply.
inline at::Tensor detached(const at::Tensor& t) { return t.defined() ? t.detach() : t; }

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kq,
                    const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                    const at::Tensor& row_ids, const at::Tensor& col_ids, double alpha) {
  check_tokens(q, "q");
  check_tokens(k, "k");
  TORCH_CHECK(q.size(2) == k.size(2), kItc, ": feature dims differ: q ", q.sizes(), ", k ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), kItc, ": q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  Inputs in;
  in.keys.push_back(k);
  if (given(kq)) {
    check_tokens(*kq, "kq");
    TORCH_CHECK(kq->size(1) == k.size(1) && kq->size(2) == k.size(2), kItc,
                ": the queue kq must have k's tokens and feature size: kq ", kq->sizes(), ", k ",
                k.sizes());
    TORCH_CHECK(kq->scalar_type() == k.scalar_type(), kItc,
                ": kq and k must have the same dtype, got ", kq->scalar_type(), " and ",
                k.scalar_type());
    in.keys.push_back(kq->detach());
  }
  in.N = q.size(0);
  in.M = k.size(0) + (given(kq) ? kq->size(0) : 0);
  in.D = q.size(2);
  in.Q = q.size(1);
  in.P = k.size(1);
  TORCH_CHECK(in.M > 0 || in.N == 0, kItc, ": the keys have no rows but q has ", in.N);
  in.rid = read_ids(row_ids, in.N, "row_ids");
  in.cid = read_ids(col_ids, in.M, "col_ids");
  in.teacher = alpha != 0.0;
  if (in.teacher) {
    TORCH_CHECK(given(tq), kItc, ": alpha = ", alpha, " needs the teacher queries tq");
    in.tq = tq->detach();
    check_tokens(in.tq, "tq");
    if (given(tk)) {
      TORCH_CHECK(!given(kq), kItc,
                  ": with a queue kq the teacher keys are the keys: tk must be None");
      check_tokens(*tk, "tk");
      in.tkeys.push_back(tk->detach());
      in.tkeys_are_keys = false;
    } else {
      in.tkeys = in.keys;
    }
    const at::Tensor& tk0 = in.tkeys[0];
    TORCH_CHECK(in.tq.size(0) == in.N && (in.tkeys_are_keys || tk0.size(0) == in.M), kItc,
                ": the teacher pair must have the rows of q and the keys: tq ", in.tq.sizes(),
                ", tk ", tk0.sizes(), " for q ", q.sizes(), " and ", in.M, " keys");
    TORCH_CHECK(in.tq.size(2) == tk0.size(2), kItc, ": teacher feature dims differ: tq ",
                in.tq.sizes(), ", tk ", tk0.sizes());
  }
  return in;
}

// x [m, P, D] as the [m * P, D] matrix the GEMMs take, in dtype dt: a view of x when a 2-D view
// describes it (always for one token: any strides, e.g. the transposed view of a [D, K] queue;
// BLAS reads them as they are), else a copy (a dtype conversion, or such a token layout).
at::Tensor key_matrix(const at::Tensor& x, at::ScalarType dt) {
  const at::Tensor y = x.scalar_type() == dt ? x : x.to(dt);
  if (x.size(1) == 1) return y.select(1, 0);
  return y.reshape({x.size(0) * x.size(1), x.size(2)});
}

// ---------------------------------------------------------------------------------------------
// float32 tiles (float32 / bfloat16 / float16 inputs).

// Floats of one tile's product buffer (1 MiB): R * C * tokens <= TILE, the extra memory per
// thread beyond O((N + M) * D) does not grow with N or M.
constexpr int64_t TILE = int64_t(1) << 18;
// Key tokens a tile gets (C * P) when the keys and TILE allow: GEMMs this wide run near peak.
constexpr int64_t TILE_COLS = 512;

struct Tile {
  int seg;      // the key segment (0: k, 1: kq)
  int64_t j0;   // first column within the segment
  int64_t col;  // first column of the keys [k; kq]
  int64_t c;    // columns
};

// The row chunks and column tiles, and which thread takes which tiles.
struct Plan {
  int64_t R = 1;             // rows per chunk
  int64_t C = 1;             // columns per tile at most
  std::vector<Tile> tiles;   // in column order
  std::vector<int64_t> part; // range p takes the tiles part[p] <= t < part[p + 1]
  int64_t ranges() const { return static_cast<int64_t>(part.size()) - 1; }
};

// tokens: the token pairs per (i, j) the product buffer holds (the student's and the teacher's).
Plan make_plan(int64_t N, const std::vector<int64_t>& seg_cols, int64_t P, int64_t tokens) {
  Plan pl;
  int64_t M = 0;
  for (const int64_t m : seg_cols) M += m;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cmin = std::max<int64_t>(1, std::min(M, ceil_div(TILE_COLS, P)));
  pl.R = std::max<int64_t>(1, std::min(std::max<int64_t>(N, 1), TILE / (tokens * cmin)));
  int64_t C = std::max<int64_t>(1, TILE / (tokens * pl.R));
  // Enough tiles for every thread when the keys are long enough to split.
  if (ceil_div(M, C) < threads) C = std::min(C, std::max<int64_t>(16, ceil_div(M, threads)));
  if (C >= 16) C = C / 16 * 16;
  pl.C = C;
  int64_t col = 0;
  for (size_t s = 0; s < seg_cols.size(); ++s) {
    const int64_t m = seg_cols[s];
    if (m > 0) {
      // About equal widths within a segment, multiples of 16 where C is one.
      const int64_t n = ceil_div(m, C);
      const int64_t w = C >= 16 ? std::min(C, ceil_div(ceil_div(m, n), 16) * 16) : ceil_div(m, n);
      for (int64_t j0 = 0; j0 < m; j0 += w) {
        pl.tiles.push_back({static_cast<int>(s), j0, col + j0, std::min(w, m - j0)});
      }
    }
    col += m;
  }
  // One contiguous range of tiles per thread, of about M / ranges columns each.
  const int64_t T = static_cast<int64_t>(pl.tiles.size());
  const int64_t np = std::max<int64_t>(1, std::min(T, threads));
  pl.part.assign(static_cast<size_t>(np + 1), T);
  pl.part[0] = 0;
  int64_t t = 0, cum = 0;
  for (int64_t p = 1; p < np; ++p) {
    const int64_t target = M * p / np;
    // The boundary nearest to the target that leaves every range at least one tile.
    while (t < T - (np - p) &&
           (t < pl.part[p - 1] + 1 || cum + pl.tiles[t].c / 2 < target)) {
      cum += pl.tiles[t].c;
      ++t;
    }
    pl.part[p] = t;
  }
  return pl;
}

// Runs body(p) for every range p: one per thread, or inline (its GEMMs and loops multithreaded)
// for a single range.
template <typename F>
void for_ranges(int64_t np, const F& body) {
  if (np == 1) {
    body(int64_t(0));
    return;
  }
  at::parallel_for(0, np, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inputs carry no autograd history
    for (int64_t p = begin; p < end; ++p) body(p);
  });
}

// The operands of the tile GEMMs.
struct Ctx {
  int64_t N = 0, M = 0, D = 0, Q = 1, P = 1, TQ = 1, TP = 1;
  bool teacher = false;
  bool stacked = false;  // the teacher's query rows are stacked under the queries: one GEMM
  Plan plan;
  // The query token rows, chunk by chunk: the rc * Q rows of q of the chunk at row r0 start at row
  // r0 * xper, followed (stacked) by its rc * TQ rows of tq. GEMM dtype, contiguous.
  at::Tensor x;
  int64_t xper = 1;
  at::Tensor tx;                 // the teacher's query rows [N * TQ, D'] (not stacked)
  std::vector<at::Tensor> keys;  // per segment [M_s * P, D], GEMM dtype, any strides
  at::Tensor tkeys;              // the teacher's keys [M * TP, D'] (not stacked)
  bool bf16 = false;             // some GEMM multiplies bfloat16
  // Several key tokens against one query token: the products are computed transposed (key
  // tokens in rows; see reduce_transposed), for the queries (and the stacked teacher queries),
  // and for the teacher's own pair.
  bool transposed = false, ttransposed = false;
};

// The [n * T, D] token rows of x [n, T, D], contiguous in dtype dt.
at::Tensor token_rows(const at::Tensor& x, at::ScalarType dt) {
  return to_contiguous(x, dt).view({x.size(0) * x.size(1), x.size(2)});
}

Ctx make_ctx(const at::Tensor& q, const Inputs& in, bool bf16_gemm, bool teacher) {
  Ctx cx;
  cx.N = in.N;
  cx.M = in.M;
  cx.D = in.D;
  cx.Q = in.Q;
  cx.P = in.P;
  cx.teacher = teacher;
  const bool native = bf16_gemm && q.scalar_type() == at::kBFloat16;
  const at::ScalarType dt = native ? at::kBFloat16 : at::kFloat;
  for (const at::Tensor& k : in.keys) cx.keys.push_back(key_matrix(k, dt));
  cx.bf16 = native;
  if (teacher) {
    cx.TQ = in.tq.size(1);
    cx.TP = in.tkeys[0].size(1);
    cx.stacked = in.tkeys_are_keys;
  }
  cx.transposed = cx.P > 1 && cx.Q == 1 && !(teacher && cx.stacked && cx.TQ > 1);
  cx.ttransposed = teacher && !cx.stacked && cx.TP > 1 && cx.TQ == 1;
  std::vector<int64_t> cols;
  for (const at::Tensor& k : in.keys) cols.push_back(k.size(0));
  cx.plan = make_plan(in.N, cols, in.P, in.Q * in.P + (teacher ? cx.TQ * cx.TP : 0));
  if (cx.stacked) {
    const int64_t R = cx.plan.R, Q = cx.Q, TQ = cx.TQ, D = cx.D;
    cx.xper = Q + TQ;
    cx.x = at::empty({in.N * cx.xper, D}, q.options().dtype(dt));
    for (int64_t r0 = 0; r0 < in.N; r0 += R) {
      const int64_t rc = std::min(R, in.N - r0), base = r0 * cx.xper;
      cx.x.narrow(0, base, rc * Q).view({rc, Q, D}).copy_(q.narrow(0, r0, rc));
      cx.x.narrow(0, base + rc * Q, rc * TQ).view({rc, TQ, D}).copy_(in.tq.narrow(0, r0, rc));
    }
  } else {
    cx.xper = cx.Q;
    cx.x = token_rows(q, dt);
    if (teacher) {
      const at::Tensor& tk = in.tkeys[0];
      const bool tnative = native && in.tq.scalar_type() == at::kBFloat16 &&
                           tk.scalar_type() == at::kBFloat16;
      const at::ScalarType tdt = tnative ? at::kBFloat16 : at::kFloat;
      cx.tx = token_rows(in.tq, tdt);
      cx.tkeys = key_matrix(tk, tdt);
    }
  }
  return cx;
}

// What one range (thread) owns: its buffers and partial results.
struct Work {
  at::Tensor prod;    // float32 products of the chunk's token rows with a tile's key tokens
  at::Tensor prod16;  // bfloat16 GEMM outputs before widening (bf16 GEMMs)
  at::Tensor S, TS;   // [R, C] similarities of pairs with several tokens (the tile's own layout)
  at::Tensor ST, IT;  // [C, 2 * R] transposed max and arg-max (reduce_transposed)
  at::Tensor idx;     // [R, C] int32 arg-max token pairs (backward)
  at::Tensor kstage;  // float32 key rows of a tile whose rows are not unit-stride (token backward)
  at::Tensor G;       // [R, C] Gumbel noise (negatives)
  at::Tensor dq;      // [R * Q, D] float32 partial dq of the chunk (backward)
  std::vector<FwdPart> acc;  // [R] the rows' statistics over this range's tiles (forward)
  std::vector<double> rowd;  // [R] per-row sum(dL * S) of one tile (backward)
  double dscale = 0.0;       // this range's sum(dL * S) over the chunk (backward)
  std::vector<float> best;   // [R] the best key so far (negatives)
  std::vector<int64_t> arg;  // [R] its column (negatives)
};

enum class Pass { kRows, kGrads, kNegatives };

std::vector<Work> make_works(const Ctx& cx, Pass pass) {
  const Plan& pl = cx.plan;
  const auto f32 = cx.x.options().dtype(at::kFloat);
  const int64_t RC = pl.R * pl.C;
  const int64_t prod = RC * (cx.Q * cx.P + (cx.teacher ? cx.TQ * cx.TP : 0));
  std::vector<Work> works(static_cast<size_t>(pl.ranges()));
  for (Work& w : works) {
    w.prod = at::empty({prod}, f32);
    if (cx.bf16 || (pass == Pass::kGrads && cx.x.scalar_type() == at::kBFloat16)) {
      w.prod16 = at::empty({prod}, f32.dtype(at::kBFloat16));
    }
    if (cx.Q * cx.P > 1) {
      w.S = at::empty({RC}, f32);
      if (pass == Pass::kGrads) w.idx = at::empty({RC}, f32.dtype(at::kInt));
    }
    if (cx.teacher && cx.TQ * cx.TP > 1) w.TS = at::empty({RC}, f32);
    if (cx.transposed || cx.ttransposed) {
      w.ST = at::empty({2 * RC}, f32);
      if (pass == Pass::kGrads) w.IT = at::empty({2 * RC}, f32.dtype(at::kInt));
    }
    if (pass == Pass::kRows) w.acc.resize(static_cast<size_t>(pl.R));
    if (pass == Pass::kGrads) {
      w.dq = at::empty({pl.R * cx.Q, cx.D}, f32);
      w.rowd.resize(static_cast<size_t>(pl.R));
    }
    if (pass == Pass::kNegatives) {
      w.G = at::empty({RC}, f32);
      w.best.resize(static_cast<size_t>(pl.R));
      w.arg.resize(static_cast<size_t>(pl.R));
    }
  }
  return works;
}

// out [rows, cols] float32 (w.prod from element off) = a [rows, D] @ b [cols, D]^T.
float* tile_gemm(Work& w, int64_t off, const at::Tensor& a, const at::Tensor& b) {
  const int64_t rows = a.size(0), cols = b.size(0);
  at::Tensor out = w.prod.narrow(0, off, rows * cols).view({rows, cols});
  if (a.scalar_type() == at::kBFloat16) {  // bf16 GEMM, its products rounded to bf16
    at::Tensor o16 = w.prod16.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(o16, a, b.t());
    out.copy_(o16);
  } else {
    at::mm_out(out, a, b.t());
  }
  return out.data_ptr<float>();
}

// A tile's similarities of the chunk's rows: S [rc, c] (row stride c), the teacher's TS [rc, c]
// (null without a teacher), and the arg-max token pairs idx [rc, c] when asked and the pairs have
// several tokens (else null).
struct TileView {
  float* S;
  float* TS;
  int32_t* idx;
};

// Several key tokens against one query token: the GEMM puts the key tokens in rows (prodT
// [c * P, rows], rows the query columns), so that the max over a key's P tokens is a vertical
// max over P rows, vectorised over the queries; the [c, rows] result is then transposed.
// outs[g] [rows_g, c] receives the query rows q0[g] <= r < q0[g] + rows_g; idx (when given) the
// arg-max token b of outs[0]'s rows.
struct TransposedOut {
  float* out;
  int64_t q0, rows;
};
void reduce_transposed(const float* prodT, int64_t rows, int64_t c, int64_t P, Work& w,
                       std::initializer_list<TransposedOut> outs, int32_t* idx) {
  float* ST = w.ST.data_ptr<float>();
  int32_t* IT = idx ? w.IT.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, c, std::max<int64_t>(1, GRAIN_ELEMS / (P * rows)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      reduce_rows(prodT + j * P * rows, rows, P, rows, ST + j * rows, IT ? IT + j * rows : nullptr);
    }
  });
  for (const TransposedOut& o : outs) {
    at::parallel_for(0, o.rows, std::max<int64_t>(1, GRAIN_ELEMS / c),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* so = o.out + r * c;
        const float* si = ST + o.q0 + r;
        for (int64_t j = 0; j < c; ++j) so[j] = si[j * rows];
        if (IT && o.out == outs.begin()->out) {
          int32_t* io = idx + r * c;
          const int32_t* ii = IT + o.q0 + r;
          for (int64_t j = 0; j < c; ++j) io[j] = ii[j * rows];
        }
      }
    });
  }
}

TileView compute_tile(const Ctx& cx, Work& w, int64_t r0, int64_t rc, const Tile& t,
                      bool need_idx) {
  const int64_t c = t.c, Q = cx.Q, P = cx.P, TQ = cx.TQ, TP = cx.TP;
  const at::Tensor kt = cx.keys[static_cast<size_t>(t.seg)].narrow(0, t.j0 * P, c * P);
  const at::Tensor xr = cx.x.narrow(0, r0 * cx.xper, rc * cx.xper);
  const bool st = Q * P > 1, tt = cx.teacher && TQ * TP > 1;
  TileView v{nullptr, nullptr, nullptr};
  if (st) {
    v.S = w.S.data_ptr<float>();
    if (need_idx) v.idx = w.idx.data_ptr<int32_t>();
  }
  if (tt) v.TS = w.TS.data_ptr<float>();

  // The queries' (and stacked teacher queries') products with the tile's keys.
  if (cx.transposed) {
    const float* prodT = tile_gemm(w, 0, kt, xr);
    if (cx.teacher && cx.stacked) {
      reduce_transposed(prodT, rc * 2, c, P, w, {{v.S, 0, rc}, {v.TS, rc, rc}}, v.idx);
    } else {
      reduce_transposed(prodT, rc, c, P, w, {{v.S, 0, rc}}, v.idx);
    }
  } else {
    float* prod = tile_gemm(w, 0, xr, kt);
    if (!st) v.S = prod;
    if (cx.teacher && cx.stacked && !tt) v.TS = prod + rc * Q * c * P;
    const bool tred = cx.teacher && cx.stacked && tt;
    if (st || tred) {
      float* tprod = prod + rc * Q * c * P;
      const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMS / (c * std::max(Q * P, TQ * TP)));
      at::parallel_for(0, rc, grain, [&](int64_t begin, int64_t end) {
        std::vector<int32_t> ta;
        for (int64_t r = begin; r < end; ++r) {
          if (st) {
            reduce_tokens(prod + r * Q * c * P, Q, c, P, 0, c, v.S + r * c,
                          v.idx ? v.idx + r * c : nullptr, ta);
          }
          if (tred) {
            reduce_tokens(tprod + r * TQ * c * TP, TQ, c, TP, 0, c, v.TS + r * c, nullptr, ta);
          }
        }
      });
    }
  }
  if (!cx.teacher || cx.stacked) return v;

  // The teacher's own pair: its products after the queries' in the buffer.
  const int64_t off = rc * Q * c * P;
  const at::Tensor tkt = cx.tkeys.narrow(0, t.col * TP, c * TP);
  const at::Tensor txr = cx.tx.narrow(0, r0 * TQ, rc * TQ);
  if (cx.ttransposed) {
    reduce_transposed(tile_gemm(w, off, tkt, txr), rc, c, TP, w, {{v.TS, 0, rc}}, nullptr);
    return v;
  }
  float* tprod = tile_gemm(w, off, txr, tkt);
  if (!tt) {
    v.TS = tprod;
    return v;
  }
  at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / (c * TQ * TP)),
                   [&](int64_t begin, int64_t end) {
    std::vector<int32_t> ta;
    for (int64_t r = begin; r < end; ++r) {
      reduce_tokens(tprod + r * TQ * c * TP, TQ, c, TP, 0, c, v.TS + r * c, nullptr, ta);
    }
  });
  return v;
}

// The rows' loss, lse, tlse and count from their statistics over all the columns.
void finish_row(const FwdPart& p, bool teacher, double alpha, double eps, int64_t M, float* loss,
                float* lse, float* tlse, float* cnt) {
  const float shift = lse_shift(p.max), tshift = lse_shift(p.tmax);
  const double row_lse = (p.max != p.max) ? static_cast<double>(p.max) : shift + std::log(p.sexp);
  double fit = 0.0;
  if (alpha != 1.0) fit += (1.0 - alpha) * p.pos / p.cnt;
  if (teacher) fit += alpha * p.tsw / p.tsexp;
  double row = row_lse - (1.0 - eps) * fit;
  if (eps != 0.0) row -= eps / static_cast<double>(M) * p.sum;
  *loss = static_cast<float>(row);
  *lse = static_cast<float>(row_lse);
  *cnt = static_cast<float>(p.cnt);
  if (teacher) *tlse = (p.tmax != p.tmax) ? p.tmax : static_cast<float>(tshift + std::log(p.tsexp));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rows_f32(const at::Tensor& q, const Inputs& in, float sc, float tsc, double alpha, double eps,
         bool bf16_gemm) {
  const int64_t N = in.N, M = in.M;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32), lse = at::empty({N}, f32), tlse = at::zeros({N}, f32),
             count = at::empty({N}, f32);
  if (N == 0) return std::make_tuple(loss, lse, tlse, count);

  const Ctx cx = make_ctx(q, in, bf16_gemm, in.teacher);
  const Plan& pl = cx.plan;
  std::vector<Work> works = make_works(cx, Pass::kRows);
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  float* o_loss = loss.data_ptr<float>();
  float* o_lse = lse.data_ptr<float>();
  float* o_tlse = tlse.data_ptr<float>();
  float* o_cnt = count.data_ptr<float>();

  for (int64_t r0 = 0; r0 < N; r0 += pl.R) {
    const int64_t rc = std::min(pl.R, N - r0);
    for_ranges(pl.ranges(), [&](int64_t p) {
      Work& w = works[static_cast<size_t>(p)];
      std::fill(w.acc.begin(), w.acc.begin() + rc, kNoColumns);
      for (int64_t ti = pl.part[p]; ti < pl.part[p + 1]; ++ti) {
        const Tile& t = pl.tiles[static_cast<size_t>(ti)];
        const TileView v = compute_tile(cx, w, r0, rc, t, /*need_idx=*/false);
        at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / t.c),
                         [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const FwdPart part = fwd_segment(v.S + r * t.c, v.TS ? v.TS + r * t.c : nullptr,
                                             cid + t.col, rid[r0 + r], t.c, sc, tsc);
            merge_parts(w.acc[static_cast<size_t>(r)], part);
          }
        });
      }
    });
    // The ranges' statistics merged in column order.
    for (int64_t r = 0; r < rc; ++r) {
      FwdPart a = works[0].acc[static_cast<size_t>(r)];
      for (size_t p = 1; p < works.size(); ++p) {
        merge_parts(a, works[p].acc[static_cast<size_t>(r)]);
      }
      const int64_t i = r0 + r;
      finish_row(a, in.teacher, alpha, eps, M, o_loss + i, o_lse + i, o_tlse + i, o_cnt + i);
    }
  }
  return std::make_tuple(loss, lse, tlse, count);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
grads_f32(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const Inputs& in,
          float sc, float tsc, const at::Tensor& lse, const at::Tensor& tlse,
          const at::Tensor& count, double alpha, double eps, bool need_dk, bool bf16_gemm) {
  const int64_t N = in.N, M = in.M, D = in.D, Q = in.Q, P = in.P, M0 = k.size(0);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({N * Q, D}, q.options());
  // dk accumulates in float32 (k's own dk for float32 keys).
  at::Tensor dk = need_dk ? at::zeros({M0 * P, D}, f32) : at::Tensor();
  double dscale = 0.0;
  auto finish = [&]() {
    return std::make_tuple(dq.view({N, Q, D}),
                           need_dk ? dk.to(k.scalar_type()).view({M0, P, D}) : k.new_empty({0}),
                           at::scalar_tensor(static_cast<double>(static_cast<float>(dscale)), f32));
  };
  if (N == 0) return finish();

  const Ctx cx = make_ctx(q, in, bf16_gemm, in.teacher);
  const Plan& pl = cx.plan;
  std::vector<Work> works = make_works(cx, Pass::kGrads);
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  const float* pg = g.data_ptr<float>();
  const float* plse = lse.data_ptr<float>();
  const float* ptlse = tlse.data_ptr<float>();
  const float* pcnt = count.data_ptr<float>();
  const bool tokens = Q * P > 1;
  const bool x16 = cx.x.scalar_type() == at::kBFloat16;
  float* dkp = need_dk ? dk.data_ptr<float>() : nullptr;

  for (int64_t r0 = 0; r0 < N; r0 += pl.R) {
    const int64_t rc = std::min(pl.R, N - r0);
    // The chunk's query token rows (GEMM dtype, contiguous).
    const at::Tensor xq = cx.x.narrow(0, r0 * cx.xper, rc * Q);
    for_ranges(pl.ranges(), [&](int64_t p) {
      Work& w = works[static_cast<size_t>(p)];
      at::Tensor dqp = w.dq.narrow(0, 0, rc * Q);
      dqp.zero_();
      w.dscale = 0.0;
      for (int64_t ti = pl.part[p]; ti < pl.part[p + 1]; ++ti) {
        const Tile& t = pl.tiles[static_cast<size_t>(ti)];
        const int64_t c = t.c;
        const TileView v = compute_tile(cx, w, r0, rc, t, /*need_idx=*/tokens);

        // S -> scale * dL in place; sum(dL * S) per row, added in row order.
        at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / c),
                         [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t i = r0 + r;
            Targets tg;
            tg.use_soft = cx.teacher;
            tg.use_hard = alpha != 1.0;
            tg.soft = static_cast<float>((1.0 - eps) * alpha);
            tg.hard =
                static_cast<float>((1.0 - eps) * (1.0 - alpha) / static_cast<double>(pcnt[i]));
            tg.flat = static_cast<float>(eps / static_cast<double>(M));
            w.rowd[static_cast<size_t>(r)] =
                bwd_segment(v.S + r * c, v.TS ? v.TS + r * c : nullptr, cid + t.col, rid[i], c,
                            sc, tsc, plse[i], cx.teacher ? ptlse[i] : 0.0f, pg[i], tg);
          }
        });
        for (int64_t r = 0; r < rc; ++r) w.dscale += w.rowd[static_cast<size_t>(r)];

        const bool dk_tile = need_dk && t.seg == 0;
        const at::Tensor kt = cx.keys[static_cast<size_t>(t.seg)].narrow(0, t.j0 * P, c * P);
        if (!tokens) {
          // dq_chunk += Z @ k_tile, dk_tile += Z^T @ q_chunk (Z = scale * dL, the tile itself).
          const at::Tensor Z = w.prod.narrow(0, 0, rc * c).view({rc, c});
          if (x16) {  // scale * dL rounded to bf16 for the bf16 GEMMs
            at::Tensor z16 = w.prod16.narrow(0, 0, rc * c).view({rc, c});
            z16.copy_(Z);
            dqp.add_(at::mm(z16, kt));
            if (dk_tile) dk.narrow(0, t.j0, c).add_(at::mm(z16.t(), xq));
          } else {
            dqp.addmm_(Z, kt);
            if (dk_tile) dk.narrow(0, t.j0, c).addmm_(Z.t(), xq);
          }
          continue;
        }
        // Several token pairs: gather / scatter at the arg-max pairs.
        float* dq_rows = dqp.data_ptr<float>();
        const float* kf = nullptr;
        const at::BFloat16* kb = nullptr;
        int64_t kld = D;
        if (kt.stride(1) == 1 && kt.scalar_type() == at::kFloat) {
          kf = kt.data_ptr<float>();
          kld = kt.stride(0);
        } else if (kt.stride(1) == 1 && kt.scalar_type() == at::kBFloat16) {
          kb = kt.data_ptr<at::BFloat16>();
          kld = kt.stride(0);
        } else {  // feature-strided key rows: staged as float32 rows
          if (!w.kstage.defined() || w.kstage.numel() < c * P * D) {
            w.kstage = at::empty({pl.C * P * D}, f32);
          }
          at::Tensor st = w.kstage.narrow(0, 0, c * P * D).view({c * P, D});
          st.copy_(kt);
          kf = st.data_ptr<float>();
        }
        at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / (c * D)),
                         [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            if (kf) {
              scatter_dq(v.S + r * c, v.idx + r * c, c, P, kf, kld, dq_rows + r * Q * D, D);
            } else {
              scatter_dq(v.S + r * c, v.idx + r * c, c, P, kb, kld, dq_rows + r * Q * D, D);
            }
          }
        });
        if (dk_tile) {
          at::parallel_for(0, c, std::max<int64_t>(1, GRAIN_ELEMS / (rc * D)),
                           [&](int64_t begin, int64_t end) {
            for (int64_t j = begin; j < end; ++j) {
              float* dk_j = dkp + (t.j0 + j) * P * D;
              if (x16) {
                scatter_dk(v.S + j, c, v.idx + j, rc, Q, P, xq.data_ptr<at::BFloat16>(), dk_j, D);
              } else {
                scatter_dk(v.S + j, c, v.idx + j, rc, Q, P, xq.data_ptr<float>(), dk_j, D);
              }
            }
          });
        }
      }
    });
    // The ranges' dq partials and dscale, added in column order.
    at::Tensor acc = works[0].dq.narrow(0, 0, rc * Q);
    for (size_t p = 1; p < works.size(); ++p) acc.add_(works[p].dq.narrow(0, 0, rc * Q));
    dq.narrow(0, r0 * Q, rc * Q).copy_(acc);
    for (const Work& w : works) dscale += w.dscale;
  }
  return finish();
}

// ---------------------------------------------------------------------------------------------
// float64 inputs (gradcheck): a row-chunked version of the same algorithm written with ATen ops
// in float64. Correctness only; chunks still bound the memory (a few R x M float64 temporaries).

struct PairF64 {
  at::Tensor q;                // [N * Q, D] contiguous float64
  std::vector<at::Tensor> k;   // key segments [M_s * P, D] float64
  int64_t Q = 1, P = 1;
};

PairF64 make_pair_f64(const at::Tensor& q, const std::vector<at::Tensor>& keys) {
  PairF64 p;
  p.Q = q.size(1);
  p.P = keys[0].size(1);
  p.q = token_rows(q, at::kDouble);
  for (const at::Tensor& k : keys) p.k.push_back(key_matrix(k, at::kDouble));
  return p;
}

// (S [rc, M], the flat arg-max token pair [rc, M] int64 or undefined for one token pair) of the rows
// r0 <= i < r0 + rc; torch.max picks the first maximal pair, as the reference's does.
std::pair<at::Tensor, at::Tensor> similarity_f64(const PairF64& p, int64_t r0, int64_t rc) {
  const at::Tensor qr = p.q.narrow(0, r0 * p.Q, rc * p.Q);
  std::vector<at::Tensor> parts;
  for (const at::Tensor& k : p.k) {
    if (k.size(0) > 0) parts.push_back(at::mm(qr, k.t()));
  }
  const at::Tensor prod = parts.size() == 1 ? parts[0] : at::cat(parts, 1);  // [rc * Q, M * P]
  if (p.Q * p.P == 1) return {prod, at::Tensor()};
  const int64_t M = prod.size(1) / p.P;
  const auto mx = prod.view({rc, p.Q, M, p.P}).permute({0, 2, 1, 3}).reshape({rc, M, p.Q * p.P})
                      .max(-1);
  return {std::get<0>(mx), std::get<1>(mx)};
}

// The chunk's positives [rc, M] bool.
at::Tensor positives_f64(const Inputs& in, int64_t r0, int64_t rc) {
  return in.rid.narrow(0, r0, rc).unsqueeze(1) == in.cid.unsqueeze(0);
}

int64_t chunk_rows_f64(const Inputs& in) {
  const int64_t tokens = std::max(in.Q * in.P, in.teacher ? in.tq.size(1) * in.tkeys[0].size(1)
                                                           : int64_t(1));
  return chunk_rows(in.N, in.M * tokens);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rows_f64(const at::Tensor& q, const Inputs& in, double sc, double tsc, double alpha, double eps) {
  const int64_t N = in.N, M = in.M;
  const auto f64 = q.options().dtype(at::kDouble);
  at::Tensor loss = at::empty({N}, f64), lse = at::empty({N}, f64), tlse = at::zeros({N}, f64),
             count = at::empty({N}, f64);
  const PairF64 sp = make_pair_f64(q, in.keys);
  PairF64 tp;
  if (in.teacher) tp = make_pair_f64(in.tq, in.tkeys);
  const int64_t R = chunk_rows_f64(in);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor L = similarity_f64(sp, r0, rc).first * sc;
    const at::Tensor pos = positives_f64(in, r0, rc);
    const at::Tensor c = pos.sum(1).to(at::kDouble);
    const at::Tensor l = at::logsumexp(L, {1});
    at::Tensor fit = at::zeros({rc}, f64);
    if (alpha != 1.0) fit = fit + (1.0 - alpha) * at::where(pos, L, at::zeros_like(L)).sum(1) / c;
    if (in.teacher) {
      const at::Tensor TL = similarity_f64(tp, r0, rc).first * tsc;
      const at::Tensor t = at::logsumexp(TL, {1});
      tlse.narrow(0, r0, rc).copy_(t);
      fit = fit + alpha * (at::exp(TL - t.unsqueeze(1)) * L).sum(1);
    }
    at::Tensor row = l - (1.0 - eps) * fit;
    if (eps != 0.0) row = row - (eps / static_cast<double>(M)) * L.sum(1);
    loss.narrow(0, r0, rc).copy_(row);
    lse.narrow(0, r0, rc).copy_(l);
    count.narrow(0, r0, rc).copy_(c);
  }
  return std::make_tuple(loss, lse, tlse, count);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
grads_f64(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const Inputs& in,
          double sc, double tsc, const at::Tensor& lse, const at::Tensor& tlse,
          const at::Tensor& count, double alpha, double eps, bool need_dk) {
  const int64_t N = in.N, M = in.M, D = in.D, Q = in.Q, P = in.P, M0 = k.size(0);
  const auto f64 = q.options().dtype(at::kDouble);
  const PairF64 sp = make_pair_f64(q, in.keys);
  PairF64 tp;
  if (in.teacher) tp = make_pair_f64(in.tq, in.tkeys);
  at::Tensor dq = at::empty({N * Q, D}, f64);
  at::Tensor dk = need_dk ? at::zeros({M0 * P, D}, f64) : at::Tensor();
  at::Tensor dscale = at::zeros({}, f64);
  const int64_t R = chunk_rows_f64(in);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const auto [S, idx] = similarity_f64(sp, r0, rc);
    const at::Tensor pos = positives_f64(in, r0, rc);
    at::Tensor T = at::zeros({rc, M}, f64);
    if (alpha != 1.0) {
      T = T + pos.to(at::kDouble) * ((1.0 - alpha) / count.narrow(0, r0, rc)).unsqueeze(1);
    }
    if (in.teacher) {
      const at::Tensor TL = similarity_f64(tp, r0, rc).first * tsc;
      T = T + alpha * at::exp(TL - tlse.narrow(0, r0, rc).unsqueeze(1));
    }
    T = (1.0 - eps) * T + eps / static_cast<double>(M);
    const at::Tensor dL =
        (at::exp(S * sc - lse.narrow(0, r0, rc).unsqueeze(1)) - T) * g.narrow(0, r0, rc).unsqueeze(1);
    dscale.add_((dL * S).sum());
    at::Tensor Z = dL * sc;
    if (idx.defined()) {
      Z = at::zeros({rc, M, Q * P}, f64)
              .scatter_(2, idx.unsqueeze(2), Z.unsqueeze(2))
              .view({rc, M, Q, P})
              .permute({0, 2, 1, 3})
              .reshape({rc * Q, M * P});
    }
    // dq rows = Z @ [k; kq] segment by segment; dk += Z[:, k's columns]^T @ q_rows.
    at::Tensor dq_rows = dq.narrow(0, r0 * Q, rc * Q);
    dq_rows.zero_();
    int64_t off = 0;
    for (size_t s = 0; s < sp.k.size(); ++s) {
      const int64_t cols = sp.k[s].size(0);
      if (cols > 0) dq_rows.addmm_(Z.narrow(1, off, cols), sp.k[s]);
      off += cols;
    }
    if (need_dk && M0 > 0) {
      dk.addmm_(Z.narrow(1, 0, M0 * P).t(), sp.q.narrow(0, r0 * Q, rc * Q));
    }
  }
  return std::make_tuple(dq.view({N, Q, D}), need_dk ? dk.view({M0, P, D}) : k.new_empty({0}),
                         dscale);
}

// ---------------------------------------------------------------------------------------------
// Hard negatives.

// MurmurHash3's 32-bit finaliser.
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// u[r, j] = ((h(seed, r0 + r, col + j) >> 9) + 0.5) * 2^-23 in float32 (exact, below 1) for the
// rows r0 <= i < r0 + rc and the columns col <= j < col + c ([rc, c], random.py).
void fill_uniform(float* u, uint32_t seed, int64_t r0, int64_t rc, int64_t col, int64_t c) {
  const uint32_t s = fmix32(seed);
  at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / c), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t row = fmix32(s ^ static_cast<uint32_t>(r0 + r));
      float* ur = u + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const uint32_t h = fmix32(row ^ (static_cast<uint32_t>(col + j) * 0x9E3779B9u));
        ur[j] = (static_cast<float>(h >> 9) + 0.5f) * 1.1920928955078125e-7f;  // 2^-23
      }
    }
  });
}

// Gumbel noise -log(-log(u)) of a [rc, c] block in place, with torch's own log, so that it is
// bitwise the reference's.
void fill_gumbel(const at::Tensor& buf, uint32_t seed, int64_t r0, int64_t rc, int64_t col,
                 int64_t c) {
  at::Tensor g = buf.narrow(0, 0, rc * c);
  fill_uniform(g.data_ptr<float>(), seed, r0, rc, col, c);
  g.log_().neg_().log_().neg_();
}

// The running pick of one row over columns col <= j < col + c: the first j maximising L + G among
// the non-positive j (a NaN key wins and stays, as torch.argmax).
void pick_columns(const float* L, const float* G, const int64_t* cid, int64_t id, int64_t col,
                  int64_t c, float& best, int64_t& arg) {
  for (int64_t j = 0; j < c; ++j) {
    if (cid[col + j] == id) continue;
    const float key = L[j] + G[j];
    if (best == best && (key > best || key != key)) {
      best = key;
      arg = col + j;
    }
  }
}

// a := the pick over a's columns followed by b's.
inline void merge_picks(float& best, int64_t& arg, float b_best, int64_t b_arg) {
  if (best == best && (b_best > best || b_best != b_best)) {
    best = b_best;
    arg = b_arg;
  }
}

// out[i]: the pick, or -1 when there is none or the best key is infinite (as the reference reads
// its masked max).
inline int64_t final_pick(float best, int64_t arg) { return std::isinf(best) ? -1 : arg; }

void negatives_f32(const at::Tensor& q, const Inputs& in, float sc, uint32_t seed, bool bf16_gemm,
                   int64_t* out) {
  const int64_t N = in.N;
  const Ctx cx = make_ctx(q, in, bf16_gemm, /*teacher=*/false);
  const Plan& pl = cx.plan;
  std::vector<Work> works = make_works(cx, Pass::kNegatives);
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < N; r0 += pl.R) {
    const int64_t rc = std::min(pl.R, N - r0);
    for_ranges(pl.ranges(), [&](int64_t p) {
      Work& w = works[static_cast<size_t>(p)];
      std::fill(w.best.begin(), w.best.begin() + rc, -kInf);
      std::fill(w.arg.begin(), w.arg.begin() + rc, int64_t(-1));
      for (int64_t ti = pl.part[p]; ti < pl.part[p + 1]; ++ti) {
        const Tile& t = pl.tiles[static_cast<size_t>(ti)];
        const int64_t c = t.c;
        float* L = compute_tile(cx, w, r0, rc, t, /*need_idx=*/false).S;
        fill_gumbel(w.G, seed, r0, rc, t.col, c);
        const float* G = w.G.data_ptr<float>();
        at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / c),
                         [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            float* lr = L + r * c;
            for (int64_t j = 0; j < c; ++j) lr[j] = lr[j] * sc;  // the float32 logits
            pick_columns(lr, G + r * c, cid, rid[r0 + r], t.col, c,
                         w.best[static_cast<size_t>(r)], w.arg[static_cast<size_t>(r)]);
          }
        });
      }
    });
    for (int64_t r = 0; r < rc; ++r) {
      float best = works[0].best[static_cast<size_t>(r)];
      int64_t arg = works[0].arg[static_cast<size_t>(r)];
      for (size_t p = 1; p < works.size(); ++p) {
        merge_picks(best, arg, works[p].best[static_cast<size_t>(r)],
                    works[p].arg[static_cast<size_t>(r)]);
      }
      out[r0 + r] = final_pick(best, arg);
    }
  }
}

void negatives_f64(const at::Tensor& q, const Inputs& in, double sc, uint32_t seed, int64_t* out) {
  const int64_t N = in.N, M = in.M;
  const auto f32 = q.options().dtype(at::kFloat);
  const PairF64 sp = make_pair_f64(q, in.keys);
  const int64_t R = chunk_rows_f64(in);
  at::Tensor G = at::empty({std::min(R, N) * M}, f32);
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor L = (similarity_f64(sp, r0, rc).first * sc).to(at::kFloat).contiguous();
    fill_gumbel(G, seed, r0, rc, 0, M);
    const float* l = L.data_ptr<float>();
    const float* gp = G.data_ptr<float>();
    at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / M), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float best = -kInf;
        int64_t arg = -1;
        pick_columns(l + r * M, gp + r * M, cid, rid[r0 + r], 0, M, best, arg);
        out[r0 + r] = final_pick(best, arg);
      }
    });
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
itc_rows(const at::Tensor& q_, const at::Tensor& k_, const std::optional<at::Tensor>& kq,
         const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
         const at::Tensor& scale, const at::Tensor& tscale, const at::Tensor& row_ids,
         const at::Tensor& col_ids, double alpha, double eps, bool bf16_gemm) {
  const at::Tensor q = detached(q_), k = detached(k_);
  const Inputs in = check_inputs(q, k, kq, tq, tk, row_ids, col_ids, alpha);
  if (q.scalar_type() == at::kDouble) {
    return rows_f64(q, in, read_scale_f64(scale, "scale", kItc),
                    read_scale_f64(tscale, "tscale", kItc), alpha, eps);
  }
  return rows_f32(q, in, read_scale(scale, "scale", kItc), read_scale(tscale, "tscale", kItc),
                  alpha, eps, bf16_gemm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
itc_grads(const at::Tensor& g, const at::Tensor& q_, const at::Tensor& k_,
          const std::optional<at::Tensor>& kq, const std::optional<at::Tensor>& tq,
          const std::optional<at::Tensor>& tk, const at::Tensor& scale, const at::Tensor& tscale,
          const at::Tensor& row_ids, const at::Tensor& col_ids, const at::Tensor& lse,
          const at::Tensor& tlse, const at::Tensor& count, double alpha, double eps, bool need_dk,
          bool bf16_gemm) {
  const at::Tensor q = detached(q_), k = detached(k_);
  const Inputs in = check_inputs(q, k, kq, tq, tk, row_ids, col_ids, alpha);
  const bool f64 = q.scalar_type() == at::kDouble;
  const at::ScalarType sd = f64 ? at::kDouble : at::kFloat;
  const at::Tensor gv = read_vector(g, in.N, "g", sd, kItc);
  const at::Tensor lv = read_vector(lse, in.N, "lse", sd, kItc);
  const at::Tensor tv = read_vector(tlse, in.N, "tlse", sd, kItc);
  const at::Tensor cv = read_vector(count, in.N, "count", sd, kItc);
  if (f64) {
    return grads_f64(gv, q, k, in, read_scale_f64(scale, "scale", kItc),
                     read_scale_f64(tscale, "tscale", kItc), lv, tv, cv, alpha, eps, need_dk);
  }
  return grads_f32(gv, q, k, in, read_scale(scale, "scale", kItc),
                   read_scale(tscale, "tscale", kItc), lv, tv, cv, alpha, eps, need_dk, bf16_gemm);
}

at::Tensor itc_negatives(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& scale,
                         const at::Tensor& row_ids, const at::Tensor& col_ids,
                         const at::Tensor& seed, bool bf16_gemm) {
  const at::Tensor q = detached(q_), k = detached(k_);
  const Inputs in =
      check_inputs(q, k, std::nullopt, std::nullopt, std::nullopt, row_ids, col_ids, 0.0);
  TORCH_CHECK(seed.defined() && seed.device().is_cpu() && seed.numel() == 1 &&
                  at::isIntegralType(seed.scalar_type(), /*includeBool=*/false),
              kItc, ": seed must be a one-element integer CPU tensor");
  const uint32_t s = static_cast<uint32_t>(seed.to(at::kLong).item<int64_t>());
  at::Tensor out = at::empty({in.N}, q.options().dtype(at::kLong));
  if (in.N == 0) return out;
  if (q.scalar_type() == at::kDouble) {
    negatives_f64(q, in, read_scale_f64(scale, "scale", kItc), s, out.data_ptr<int64_t>());
  } else {
    negatives_f32(q, in, read_scale(scale, "scale", kItc), s, bf16_gemm, out.data_ptr<int64_t>());
  }
  return out;
}

}  // namespace mmkernels
