// mmkernels: the ALBEF / BLIP / BLIP-2 contrastive objectives (the itc unit) on the CPU: per-row
// losses against soft targets (forward), their gradients (backward) and Gumbel-max hard negatives.
//
// The N x M similarities are never materialised: rows are processed in chunks of R rows, each chunk
// multiplies its [R * Q, D] query tokens by the [M * P, D] key tokens with one BLAS GEMM into a
// reused float32 buffer (R * Q * M * P <= BUDGET floats, the contrastive kernels' chunking), and
// fused, vectorised loops reduce it to the max over token pairs (with its arg-max in the backward)
// and then to the row statistics: log-sum-exp, the positives' count and sum, the teacher's
// log-sum-exp and softmax-weighted sum of the logits (row segments merged online, rescaled to the
// larger max). The backward recomputes a chunk, forms scale * dL in place, places it at the arg-max
// token pairs of a zeroed [R * Q, M * P] buffer (the chunk itself for one token pair) and feeds it
// to two GEMMs: the chunk's dq rows and its share of dk, accumulated serially across chunks.
// bf16/fp16 inputs are converted to float32 once (O(N*D)), or multiplied with bf16 GEMMs when the
// caller asks (bf16_gemm); float64 inputs (gradcheck) take a plain ATen float64 version of the same
// chunked algorithm. The exact contract is in mmkernels/contrastive/itc/ops.py.

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

typedef int64_t wl __attribute__((vector_size(WL * sizeof(int64_t))));

// The lanes j where ids[j] == id (a comparison mask of wi lanes).
CPU_MATH_INLINE wi equal_lanes(const int64_t* ids, int64_t id) {
  wl c;
  __builtin_memcpy(&c, ids, sizeof(c));
  return __builtin_convertvector(c == (wl{} + id), wi);
}
// The same for the first n (< WL) entries; the other lanes are false.
CPU_MATH_INLINE wi equal_lanes_n(const int64_t* ids, int64_t n, int64_t id) {
  int64_t t[WL];
  for (int i = 0; i < WL; ++i) t[i] = i < n ? ids[i] : ~id;
  return equal_lanes(t, id);
}

// ---------------------------------------------------------------------------------------------
// The max over token pairs (multiversioned hot loops).

// out[j] = max_{a < Q} x[a * ld + j] for j < n and, when idx is given, idx[j] = the first maximal a
// (a later a wins only when strictly greater; a NaN wins, as torch.max). out may be x itself.
CPU_MATH_MULTIVERSION
void reduce_rows(const float* x, int64_t ld, int64_t Q, int64_t n, float* out, int32_t* idx) {
  int64_t j = 0;
  for (; j + WL <= n; j += WL) {
    wf best = vload<wf>(x + j);
    wi arg = wi{};
    for (int64_t a = 1; a < Q; ++a) {
      const wf v = vload<wf>(x + a * ld + j);
      const wi up = (v > best) | ((v != v) & (best == best));
      best = vsel(up, v, best);
      arg = vsel(up, wi{} + static_cast<int32_t>(a), arg);
    }
    vstore(out + j, best);
    if (idx) __builtin_memcpy(idx + j, &arg, sizeof(arg));
  }
  for (; j < n; ++j) {
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
  wf vmax = ninf, vtmax = ninf;
  int64_t j = 0;
  // Pass 1: logits in place, their max and sum, the positives; the teacher logits and their max.
  while (j < n) {
    wf acc = zero, cacc = zero, pacc = zero;
    const int64_t stop = std::min(n, j + FLUSH * WL);
    for (; j + WL <= stop; j += WL) {
      const wf l = logit(scale, vload<wf>(s + j));
      vstore(s + j, l);
      vmax = vmax_nan(vmax, l);
      acc += l;
      const wi pos = equal_lanes(cid + j, rid);
      cacc += vsel(pos, one, zero);
      pacc += vsel(pos, l, zero);
      if (ts) {
        const wf tl = logit(tscale, vload<wf>(ts + j));
        vstore(ts + j, tl);
        vtmax = vmax_nan(vtmax, tl);
      }
    }
    if (j < stop) {  // tail of the row, fewer than WL elements
      const int64_t k = stop - j;
      const wi valid = vlanes_below<wf>(k);
      const wf l = logit(scale, vload_n<wf>(s + j, k, 0.0f));
      vstore_n(s + j, l, k);
      vmax = vmax_nan(vmax, vsel(valid, l, ninf));
      acc += vsel(valid, l, zero);
      const wi pos = equal_lanes_n(cid + j, k, rid);
      cacc += vsel(pos, one, zero);
      pacc += vsel(pos, l, zero);
      if (ts) {
        const wf tl = logit(tscale, vload_n<wf>(ts + j, k, 0.0f));
        vstore_n(ts + j, tl, k);
        vtmax = vmax_nan(vtmax, vsel(valid, tl, ninf));
      }
      j = stop;
    }
    p.sum += vhsum(acc);
    p.cnt += vhsum(cacc);
    p.pos += vhsum(pacc);
  }
  p.max = vhmax_nan(vmax);
  p.tmax = ts ? vhmax_nan(vtmax) : -kInf;

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
// Inputs.

struct Inputs {
  int64_t N, M, D, Q, P;
  at::Tensor rid, cid;  // contiguous int64 [N], [M]
  bool teacher;         // alpha != 0
  at::Tensor tq, tk;    // the teacher pair (tk = k when absent), defined when teacher
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

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& tq,
                    const std::optional<at::Tensor>& tk, const at::Tensor& row_ids,
                    const at::Tensor& col_ids, double alpha) {
  check_tokens(q, "q");
  check_tokens(k, "k");
  TORCH_CHECK(q.size(2) == k.size(2), kItc, ": feature dims differ: q ", q.sizes(), ", k ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), kItc, ": q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  Inputs in;
  in.N = q.size(0);
  in.M = k.size(0);
  in.D = q.size(2);
  in.Q = q.size(1);
  in.P = k.size(1);
  TORCH_CHECK(in.M > 0 || in.N == 0, kItc, ": k has no rows but q has ", in.N);
  in.rid = read_ids(row_ids, in.N, "row_ids");
  in.cid = read_ids(col_ids, in.M, "col_ids");
  in.teacher = alpha != 0.0;
  if (in.teacher) {
    TORCH_CHECK(tq.has_value() && tq->defined(), kItc, ": alpha = ", alpha,
                " needs the teacher queries tq");
    in.tq = *tq;
    in.tk = (tk.has_value() && tk->defined()) ? *tk : k;
    check_tokens(in.tq, "tq");
    check_tokens(in.tk, "tk");
    TORCH_CHECK(in.tq.size(0) == in.N && in.tk.size(0) == in.M, kItc,
                ": the teacher pair must have the rows of q and k: tq ", in.tq.sizes(), ", tk ",
                in.tk.sizes(), " for q ", q.sizes(), ", k ", k.sizes());
    TORCH_CHECK(in.tq.size(2) == in.tk.size(2), kItc, ": teacher feature dims differ: tq ",
                in.tq.sizes(), ", tk ", in.tk.sizes());
  }
  return in;
}

// ---------------------------------------------------------------------------------------------
// float32 chunks (float32 / bfloat16 / float16 inputs).

// One pair of features as the chunk GEMMs take them.
struct Pair {
  at::Tensor q, k;  // [N * Q, D], [M * P, D] contiguous, float32 (bfloat16 when native)
  int64_t Q = 1, P = 1;
  bool native = false;
  int64_t tokens() const { return Q * P; }
};

Pair make_pair(const at::Tensor& q, const at::Tensor& k, bool bf16_gemm) {
  Pair p;
  p.Q = q.size(1);
  p.P = k.size(1);
  p.native = bf16_gemm && q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16;
  const at::ScalarType dt = p.native ? at::kBFloat16 : at::kFloat;
  p.q = to_contiguous(q, dt).view({q.size(0) * p.Q, q.size(2)});
  p.k = to_contiguous(k, dt).view({k.size(0) * p.P, k.size(2)});
  return p;
}

// The chunk's buffers, allocated once: S (and TS) [R, M], the arg-max token pairs [R, M], and the
// products [R * Q, M * P] of the pairs with several tokens.
struct Work {
  int64_t R;
  at::Tensor S, TS, idx, prod;  // flat
};

// Rows per chunk: the largest product buffer stays within BUDGET floats.
int64_t itc_chunk_rows(const Inputs& in, const Pair& sp, const Pair* tp) {
  const int64_t tokens = std::max(sp.tokens(), tp ? tp->tokens() : int64_t(1));
  return chunk_rows(in.N, in.M * tokens);
}

Work make_work(const Inputs& in, const Pair& sp, const Pair* tp, bool need_idx) {
  const auto f32 = sp.q.options().dtype(at::kFloat);
  Work w;
  w.R = itc_chunk_rows(in, sp, tp);
  const int64_t RM = w.R * std::max<int64_t>(in.M, 1);
  w.S = at::empty({RM}, f32);
  if (tp) w.TS = at::empty({RM}, f32);
  if (need_idx && sp.tokens() > 1) w.idx = at::empty({RM}, f32.dtype(at::kInt));
  int64_t tokens = sp.tokens() > 1 ? sp.tokens() : 0;
  if (tp && tp->tokens() > 1) tokens = std::max(tokens, tp->tokens());
  if (tokens > 0) w.prod = at::empty({RM * tokens}, f32);
  return w;
}

// The first rows * cols elements of a flat buffer as a [rows, cols] matrix.
at::Tensor matrix(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// out [rows, M * P] = the query token rows q0 <= . < q0 + rows of p times its keys^T (float32).
at::Tensor gemm_into(const Pair& p, int64_t q0, int64_t rows, const at::Tensor& buf) {
  at::Tensor out = matrix(buf, rows, p.k.size(0));
  const at::Tensor qr = p.q.narrow(0, q0, rows);
  if (p.native) {
    out.copy_(at::mm(qr, p.k.t()));
  } else {
    at::mm_out(out, qr, p.k.t());
  }
  return out;
}

// S [rc, M] (into S_buf) of the rows r0 <= i < r0 + rc of pair p, with the flat arg-max token pair
// idx [rc, M] when idx is given (pairs with several tokens).
void similarity(const Pair& p, int64_t r0, int64_t rc, int64_t M, const at::Tensor& S_buf,
                int32_t* idx, const at::Tensor& prod_buf) {
  if (p.tokens() == 1) {
    gemm_into(p, r0, rc, S_buf);
    return;
  }
  float* prod = gemm_into(p, r0 * p.Q, rc * p.Q, prod_buf).data_ptr<float>();
  float* S = S_buf.data_ptr<float>();
  const int64_t Q = p.Q, P = p.P, MP = M * P;
  const RowSplit sp = split_rows(rc, M);
  const int64_t grain = std::max<int64_t>(1, sp.grain / (Q * P));
  at::parallel_for(0, rc * sp.segments, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> ta;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t r = it / sp.segments, c0 = (it % sp.segments) * sp.width;
      const int64_t c1 = std::min(M, c0 + sp.width);
      reduce_tokens(prod + r * Q * MP, Q, M, P, c0, c1, S + r * M, idx ? idx + r * M : nullptr, ta);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rows_f32(const at::Tensor& q, const at::Tensor& k, const Inputs& in, float sc, float tsc,
         double alpha, double eps, bool bf16_gemm) {
  const int64_t N = in.N, M = in.M;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32), lse = at::empty({N}, f32), tlse = at::zeros({N}, f32),
             count = at::empty({N}, f32);
  if (N == 0) return std::make_tuple(loss, lse, tlse, count);

  const Pair sp = make_pair(q, k, bf16_gemm);
  Pair tpair;
  if (in.teacher) tpair = make_pair(in.tq, in.tk, bf16_gemm);
  const Pair* tp = in.teacher ? &tpair : nullptr;
  const Work w = make_work(in, sp, tp, /*need_idx=*/false);
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  float* o_loss = loss.data_ptr<float>();
  float* o_lse = lse.data_ptr<float>();
  float* o_tlse = tlse.data_ptr<float>();
  float* o_cnt = count.data_ptr<float>();
  std::vector<FwdPart> parts;

  for (int64_t r0 = 0; r0 < N; r0 += w.R) {
    const int64_t rc = std::min(w.R, N - r0);
    similarity(sp, r0, rc, M, w.S, nullptr, w.prod);
    if (tp) similarity(*tp, r0, rc, M, w.TS, nullptr, w.prod);
    float* S = w.S.data_ptr<float>();
    float* TS = tp ? w.TS.data_ptr<float>() : nullptr;

    const RowSplit split = split_rows(rc, M);
    parts.resize(static_cast<size_t>(rc * split.segments));
    at::parallel_for(0, rc * split.segments, split.grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / split.segments, c0 = (it % split.segments) * split.width;
        const int64_t c1 = std::min(M, c0 + split.width);
        parts[it] = fwd_segment(S + r * M + c0, TS ? TS + r * M + c0 : nullptr, cid + c0,
                                rid[r0 + r], c1 - c0, sc, tsc);
      }
    });

    for (int64_t r = 0; r < rc; ++r) {
      const FwdPart* p = parts.data() + r * split.segments;
      float m = -kInf, tm = -kInf;
      double sum = 0.0, cnt = 0.0, pos = 0.0;
      for (int64_t c = 0; c < split.segments; ++c) {
        m = nan_max(m, p[c].max);
        tm = nan_max(tm, p[c].tmax);
        sum += p[c].sum;
        cnt += p[c].cnt;
        pos += p[c].pos;
      }
      // Merge the segments' sums of exponentials at the row's max.
      const float shift = lse_shift(m), tshift = lse_shift(tm);
      double se = 0.0, tse = 0.0, tsw = 0.0;
      for (int64_t c = 0; c < split.segments; ++c) {
        if (p[c].sexp != 0.0) {
          se += split.segments == 1
                    ? p[c].sexp
                    : p[c].sexp * std::exp(static_cast<double>(lse_shift(p[c].max)) - shift);
        }
        if (tp && p[c].tsexp != 0.0) {
          const double f = split.segments == 1
                               ? 1.0
                               : std::exp(static_cast<double>(lse_shift(p[c].tmax)) - tshift);
          tse += p[c].tsexp * f;
          tsw += p[c].tsw * f;
        }
      }
      const double row_lse = (m != m) ? static_cast<double>(m) : shift + std::log(se);
      double fit = 0.0;
      if (alpha != 1.0) fit += (1.0 - alpha) * pos / cnt;
      if (tp) fit += alpha * tsw / tse;
      double row = row_lse - (1.0 - eps) * fit;
      if (eps != 0.0) row -= eps / static_cast<double>(M) * sum;
      const int64_t i = r0 + r;
      o_loss[i] = static_cast<float>(row);
      o_lse[i] = static_cast<float>(row_lse);
      o_cnt[i] = static_cast<float>(cnt);
      if (tp) o_tlse[i] = (tm != tm) ? tm : static_cast<float>(tshift + std::log(tse));
    }
  }
  return std::make_tuple(loss, lse, tlse, count);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
grads_f32(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const Inputs& in,
          float sc, float tsc, const at::Tensor& lse, const at::Tensor& tlse,
          const at::Tensor& count, double alpha, double eps, bool need_dk, bool bf16_gemm) {
  const int64_t N = in.N, M = in.M, D = in.D, Q = in.Q, P = in.P;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({N * Q, D}, q.options());
  at::Tensor dk = need_dk ? at::zeros({M * P, D}, f32) : at::Tensor();
  double dscale = 0.0;
  auto finish = [&]() {
    return std::make_tuple(dq.view({N, Q, D}),
                           need_dk ? dk.to(k.scalar_type()).view({M, P, D}) : k.new_empty({0}),
                           at::scalar_tensor(static_cast<double>(static_cast<float>(dscale)), f32));
  };
  if (N == 0) return finish();

  const Pair sp = make_pair(q, k, bf16_gemm);
  Pair tpair;
  if (in.teacher) tpair = make_pair(in.tq, in.tk, bf16_gemm);
  const Pair* tp = in.teacher ? &tpair : nullptr;
  const Work w = make_work(in, sp, tp, /*need_idx=*/true);
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  const float* pg = g.data_ptr<float>();
  const float* plse = lse.data_ptr<float>();
  const float* ptlse = tlse.data_ptr<float>();
  const float* pcnt = count.data_ptr<float>();
  const bool dq_f32 = q.scalar_type() == at::kFloat;
  const int64_t tokens = sp.tokens(), MP = M * P;
  at::Tensor dq_stage =
      (dq_f32 || sp.native) ? at::Tensor() : at::empty({std::min(w.R, N) * Q, D}, f32);
  int32_t* idx = tokens > 1 ? w.idx.data_ptr<int32_t>() : nullptr;
  std::vector<double> parts;

  for (int64_t r0 = 0; r0 < N; r0 += w.R) {
    const int64_t rc = std::min(w.R, N - r0);
    similarity(sp, r0, rc, M, w.S, idx, w.prod);
    if (tp) similarity(*tp, r0, rc, M, w.TS, nullptr, w.prod);
    float* S = w.S.data_ptr<float>();
    const float* TS = tp ? w.TS.data_ptr<float>() : nullptr;

    // S -> scale * dL in place; sum(dL * S) per work item.
    const RowSplit split = split_rows(rc, M);
    parts.resize(static_cast<size_t>(rc * split.segments));
    at::parallel_for(0, rc * split.segments, split.grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / split.segments, c0 = (it % split.segments) * split.width;
        const int64_t c1 = std::min(M, c0 + split.width);
        const int64_t i = r0 + r;
        Targets t;
        t.use_soft = tp != nullptr;
        t.use_hard = alpha != 1.0;
        t.soft = static_cast<float>((1.0 - eps) * alpha);
        t.hard = static_cast<float>((1.0 - eps) * (1.0 - alpha) / static_cast<double>(pcnt[i]));
        t.flat = static_cast<float>(eps / static_cast<double>(M));
        parts[it] = bwd_segment(S + r * M + c0, TS ? TS + r * M + c0 : nullptr, cid + c0, rid[i],
                                c1 - c0, sc, tsc, plse[i], tp ? ptlse[i] : 0.0f, pg[i], t);
      }
    });
    for (const double p : parts) dscale += p;

    // The matrix the two GEMMs take: scale * dL itself, or placed at the arg-max token pairs.
    at::Tensor Z;
    if (tokens == 1) {
      Z = matrix(w.S, rc, M);
    } else {
      Z = matrix(w.prod, rc * Q, MP);
      float* z = Z.data_ptr<float>();
      at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / (Q * MP)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          float* zr = z + r * Q * MP;
          std::fill(zr, zr + Q * MP, 0.0f);
          const float* sr = S + r * M;
          const int32_t* ir = idx + r * M;
          for (int64_t j = 0; j < M; ++j) {
            const int64_t a = ir[j] / P, b = ir[j] - a * P;
            zr[a * MP + j * P + b] = sr[j];
          }
        }
      });
    }

    // dq rows = Z @ k ; dk += Z^T @ q_rows.
    const at::Tensor q_rows = sp.q.narrow(0, r0 * Q, rc * Q);
    if (sp.native) {  // scale * dL rounded to bf16 for the bf16 GEMMs
      const at::Tensor z16 = Z.to(at::kBFloat16);
      at::Tensor dq_rows = dq.narrow(0, r0 * Q, rc * Q);
      at::mm_out(dq_rows, z16, sp.k);
      if (need_dk) dk.add_(at::mm(z16.t(), q_rows));
      continue;
    }
    at::Tensor dq_rows = dq_f32 ? dq.narrow(0, r0 * Q, rc * Q) : dq_stage.narrow(0, 0, rc * Q);
    at::mm_out(dq_rows, Z, sp.k);
    if (!dq_f32) dq.narrow(0, r0 * Q, rc * Q).copy_(dq_rows);
    if (need_dk) dk.addmm_(Z.t(), q_rows);
  }
  return finish();
}

// ---------------------------------------------------------------------------------------------
// float64 inputs (gradcheck): the same chunked algorithm written with ATen ops in float64.
// Correctness only; chunks still bound the memory (a few R x M float64 temporaries).

struct PairF64 {
  at::Tensor q, k;  // [N * Q, D], [M * P, D] contiguous float64
  int64_t Q = 1, P = 1;
};

PairF64 make_pair_f64(const at::Tensor& q, const at::Tensor& k) {
  PairF64 p;
  p.Q = q.size(1);
  p.P = k.size(1);
  p.q = to_contiguous(q, at::kDouble).view({q.size(0) * p.Q, q.size(2)});
  p.k = to_contiguous(k, at::kDouble).view({k.size(0) * p.P, k.size(2)});
  return p;
}

// (S [rc, M], the flat arg-max token pair [rc, M] int64 or undefined for one token pair) of the rows
// r0 <= i < r0 + rc; torch.max picks the first maximal pair, as the reference's does.
std::pair<at::Tensor, at::Tensor> similarity_f64(const PairF64& p, int64_t r0, int64_t rc) {
  const at::Tensor prod = at::mm(p.q.narrow(0, r0 * p.Q, rc * p.Q), p.k.t());
  if (p.Q * p.P == 1) return {prod, at::Tensor()};
  const int64_t M = p.k.size(0) / p.P;
  const auto mx = prod.view({rc, p.Q, M, p.P}).permute({0, 2, 1, 3}).reshape({rc, M, p.Q * p.P})
                      .max(-1);
  return {std::get<0>(mx), std::get<1>(mx)};
}

// The chunk's positives [rc, M] bool.
at::Tensor positives_f64(const Inputs& in, int64_t r0, int64_t rc) {
  return in.rid.narrow(0, r0, rc).unsqueeze(1) == in.cid.unsqueeze(0);
}

int64_t chunk_rows_f64(const Inputs& in) {
  const int64_t tokens = std::max(in.Q * in.P, in.teacher ? in.tq.size(1) * in.tk.size(1)
                                                           : int64_t(1));
  return chunk_rows(in.N, in.M * tokens);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rows_f64(const at::Tensor& q, const at::Tensor& k, const Inputs& in, double sc, double tsc,
         double alpha, double eps) {
  const int64_t N = in.N, M = in.M;
  const auto f64 = q.options().dtype(at::kDouble);
  at::Tensor loss = at::empty({N}, f64), lse = at::empty({N}, f64), tlse = at::zeros({N}, f64),
             count = at::empty({N}, f64);
  const PairF64 sp = make_pair_f64(q, k);
  PairF64 tp;
  if (in.teacher) tp = make_pair_f64(in.tq, in.tk);
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
  const int64_t N = in.N, M = in.M, D = in.D, Q = in.Q, P = in.P;
  const auto f64 = q.options().dtype(at::kDouble);
  const PairF64 sp = make_pair_f64(q, k);
  PairF64 tp;
  if (in.teacher) tp = make_pair_f64(in.tq, in.tk);
  at::Tensor dq = at::empty({N * Q, D}, f64);
  at::Tensor dk = need_dk ? at::zeros({M * P, D}, f64) : at::Tensor();
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
    at::Tensor dq_rows = dq.narrow(0, r0 * Q, rc * Q);
    at::mm_out(dq_rows, Z, sp.k);
    if (need_dk) dk.addmm_(Z.t(), sp.q.narrow(0, r0 * Q, rc * Q));
  }
  return std::make_tuple(dq.view({N, Q, D}), need_dk ? dk.view({M, P, D}) : k.new_empty({0}),
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

// u[r, j] = ((h(seed, r0 + r, j) >> 9) + 0.5) * 2^-23 in float32 (exact, below 1) for a chunk [rc, M] (random.py).
void fill_uniform(float* u, uint32_t seed, int64_t r0, int64_t rc, int64_t M) {
  const uint32_t s = fmix32(seed);
  at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / M), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t row = fmix32(s ^ static_cast<uint32_t>(r0 + r));
      float* ur = u + r * M;
      for (int64_t j = 0; j < M; ++j) {
        const uint32_t h = fmix32(row ^ (static_cast<uint32_t>(j) * 0x9E3779B9u));
        ur[j] = (static_cast<float>(h >> 9) + 0.5f) * 1.1920928955078125e-7f;  // 2^-23
      }
    }
  });
}

// out[i] for the rows of a chunk from their float32 logits L [rc, M] and Gumbel noise G [rc, M]:
// the first j maximising L + G among the non-positive j (a NaN key wins, as torch.argmax), -1
// when there is none or the best key is infinite (as the reference reads its masked max).
void pick_negatives(const float* L, const float* G, const int64_t* rid, const int64_t* cid,
                    int64_t r0, int64_t rc, int64_t M, int64_t* out) {
  at::parallel_for(0, rc, std::max<int64_t>(1, GRAIN_ELEMS / M), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* lr = L + r * M;
      const float* gr = G + r * M;
      const int64_t id = rid[r0 + r];
      float best = -kInf;
      int64_t arg = -1;
      for (int64_t j = 0; j < M; ++j) {
        if (cid[j] == id) continue;
        const float key = lr[j] + gr[j];
        if (best == best && (key > best || key != key)) {
          best = key;
          arg = j;
        }
      }
      out[r0 + r] = std::isinf(best) ? -1 : arg;
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
itc_rows(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& tq,
         const std::optional<at::Tensor>& tk, const at::Tensor& scale, const at::Tensor& tscale,
         const at::Tensor& row_ids, const at::Tensor& col_ids, double alpha, double eps,
         bool bf16_gemm) {
  const Inputs in = check_inputs(q, k, tq, tk, row_ids, col_ids, alpha);
  if (q.scalar_type() == at::kDouble) {
    return rows_f64(q, k, in, read_scale_f64(scale, "scale", kItc),
                    read_scale_f64(tscale, "tscale", kItc), alpha, eps);
  }
  return rows_f32(q, k, in, read_scale(scale, "scale", kItc), read_scale(tscale, "tscale", kItc),
                  alpha, eps, bf16_gemm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
itc_grads(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
          const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
          const at::Tensor& scale, const at::Tensor& tscale, const at::Tensor& row_ids,
          const at::Tensor& col_ids, const at::Tensor& lse, const at::Tensor& tlse,
          const at::Tensor& count, double alpha, double eps, bool need_dk, bool bf16_gemm) {
  const Inputs in = check_inputs(q, k, tq, tk, row_ids, col_ids, alpha);
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

at::Tensor itc_negatives(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                         const at::Tensor& row_ids, const at::Tensor& col_ids,
                         const at::Tensor& seed, bool bf16_gemm) {
  const Inputs in = check_inputs(q, k, std::nullopt, std::nullopt, row_ids, col_ids, 0.0);
  TORCH_CHECK(seed.defined() && seed.device().is_cpu() && seed.numel() == 1 &&
                  at::isIntegralType(seed.scalar_type(), /*includeBool=*/false),
              kItc, ": seed must be a one-element integer CPU tensor");
  const uint32_t s = static_cast<uint32_t>(seed.to(at::kLong).item<int64_t>());
  const int64_t N = in.N, M = in.M;
  at::Tensor out = at::empty({N}, q.options().dtype(at::kLong));
  if (N == 0) return out;
  const bool f64 = q.scalar_type() == at::kDouble;
  const int64_t* rid = in.rid.data_ptr<int64_t>();
  const int64_t* cid = in.cid.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const auto f32 = q.options().dtype(at::kFloat);

  Pair sp;
  PairF64 sp64;
  Work w;
  double sc64 = 0.0;
  float sc = 0.0f;
  if (f64) {
    sp64 = make_pair_f64(q, k);
    sc64 = read_scale_f64(scale, "scale", kItc);
    w.R = chunk_rows_f64(in);
    w.S = at::empty({w.R * M}, f32);
  } else {
    sp = make_pair(q, k, bf16_gemm);
    sc = read_scale(scale, "scale", kItc);
    w = make_work(in, sp, nullptr, /*need_idx=*/false);
  }
  at::Tensor G = at::empty({w.R * M}, f32);

  for (int64_t r0 = 0; r0 < N; r0 += w.R) {
    const int64_t rc = std::min(w.R, N - r0);
    // The float32 logits of the chunk.
    if (f64) {
      matrix(w.S, rc, M).copy_(similarity_f64(sp64, r0, rc).first * sc64);
    } else {
      similarity(sp, r0, rc, M, w.S, nullptr, w.prod);
      float* S = w.S.data_ptr<float>();
      at::parallel_for(0, rc * M, GRAIN_ELEMS, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) S[e] = S[e] * sc;
      });
    }
    // Gumbel noise -log(-log(u)) with torch's own log, so that it is bitwise the reference's.
    at::Tensor g = matrix(G, rc, M);
    fill_uniform(g.data_ptr<float>(), s, r0, rc, M);
    g.log_().neg_().log_().neg_();
    pick_negatives(w.S.data_ptr<float>(), g.data_ptr<float>(), rid, cid, r0, rc, M, o);
  }
  return out;
}

}  // namespace mmkernels
