// mmkernels: blockwise contrastive statistics on the CPU (the forward; the backward is in
// contrastive_grads.cpp).
//
// The logits L = scale * q @ k^T are never materialised: rows are processed in chunks of R rows
// (R * M <= BUDGET floats), S = q_rows @ k^T goes through BLAS into one reused R x M float32
// buffer, and fused, vectorised loops turn each chunk into row statistics and into running
// (online log-sum-exp) column statistics. bf16/fp16 inputs are converted to float32 once
// (O(N*D)); float64 inputs (gradcheck) take a plain ATen float64 version of the same chunked
// algorithm. The exact contract is in mmkernels/contrastive/ops.py.

#include "contrastive.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "contrastive_internal.h"

namespace mmkernels {
namespace {

using namespace contrastive_detail;

// ---------------------------------------------------------------------------------------------
// The hot loops (multiversioned).

// One row segment of the forward: x <- scale * x in place; returns its max (NaN if any element
// is NaN).
CPU_MATH_MULTIVERSION
void scale_max(float* x, int64_t n, float scale, float* out_max) {
  wf vmax = vsplat<wf>(-kInf);
  int64_t j = 0;
  for (; j + WL <= n; j += WL) {
    const wf v = logit(scale, vload<wf>(x + j));
    vstore(x + j, v);
    vmax = vmax_nan(vmax, v);
  }
  if (j < n) {  // tail of the row, fewer than WL elements
    const int64_t k = n - j;
    const wf v = logit(scale, vload_n<wf>(x + j, k, 0.0f));
    vstore_n(x + j, v, k);
    vmax = vmax_nan(vmax, vsel(vlanes_below<wf>(k), v, vsplat<wf>(-kInf)));
  }
  *out_max = vhmax_nan(vmax);
}

// sum_j exp(x[j] - shift) and sum_j (x[j] - shift) for a finite shift (the second is the plain
// sum taken relative to the max: label smoothing needs it without cancellation).
CPU_MATH_MULTIVERSION
void sum_exp(const float* x, int64_t n, float shift, double* out_sexp, double* out_ssum) {
  double total = 0.0, shifted = 0.0;
  int64_t j = 0;
  while (j < n) {
    wf acc = vsplat<wf>(0.0f), acc_s = vsplat<wf>(0.0f);
    const int64_t stop = std::min(n, j + FLUSH * WL);
    for (; j + WL <= stop; j += WL) {
      const wf d = vload<wf>(x + j) - shift;
      acc += vexp(d);
      acc_s += d;
    }
    if (j < stop) {  // padded lanes are -inf: exp gives 0
      const int64_t k = stop - j;
      const wf d = vload_n<wf>(x + j, k, -kInf) - shift;
      acc += vexp(d);
      acc_s += vsel(vlanes_below<wf>(k), d, vsplat<wf>(0.0f));
      j = stop;
    }
    total += vhsum(acc);
    shifted += vhsum(acc_s);
  }
  *out_sexp = total;
  *out_ssum = shifted;
}

// Column statistics of one block of cw (<= COL_BLOCK) columns over `rows` rows of the chunk
// (row stride ld), merged into the running per-column (max, sum exp(L - shift(max)),
// sum (L - shift(max))); `seen` rows were merged before (their shifted sums move with the shift).
CPU_MATH_MULTIVERSION
void column_block(const float* b, int64_t rows, int64_t ld, int64_t cw, int64_t seen,
                  float* run_max, double* run_sexp, double* run_sum) {
  constexpr int64_t G = COL_BLOCK / WL;
  static_assert(COL_BLOCK % WL == 0, "COL_BLOCK must be a multiple of the SIMD width");
  const int64_t full = cw / WL, tail = cw - full * WL, groups = full + (tail ? 1 : 0);
  wf cmax[G], acc[G], acc_s[G], shift[G];
  float lanes[COL_BLOCK];
  double csum[COL_BLOCK], cexp[COL_BLOCK];
  for (int64_t g = 0; g < groups; ++g) cmax[g] = vsplat<wf>(-kInf);
  for (int64_t j = 0; j < cw; ++j) csum[j] = cexp[j] = 0.0;

  // Pass 1: column max (NaN-propagating). Lanes past cw are never read back.
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = b + r * ld;
    for (int64_t g = 0; g < full; ++g) cmax[g] = vmax_nan(cmax[g], vload<wf>(xr + g * WL));
    if (tail) cmax[full] = vmax_nan(cmax[full], vload_n<wf>(xr + full * WL, tail, 0.0f));
  }

  // Merge into the running statistics: rescale the running sum of exponentials to the new max,
  // and move the running shifted sum of the `seen` rows to the new shift.
  for (int64_t g = 0; g < groups; ++g) vstore(lanes + g * WL, cmax[g]);
  for (int64_t j = 0; j < cw; ++j) {
    const float old_max = run_max[j];
    const float new_max = nan_max(old_max, lanes[j]);
    const float new_shift = lse_shift(new_max);
    const double delta = static_cast<double>(lse_shift(old_max)) - new_shift;
    if (run_sexp[j] != 0.0) run_sexp[j] *= std::exp(delta);
    if (seen > 0) run_sum[j] += static_cast<double>(seen) * delta;
    run_max[j] = new_max;
    lanes[j] = new_shift;
  }
  for (int64_t j = cw; j < groups * WL; ++j) lanes[j] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) shift[g] = vload<wf>(lanes + g * WL);

  // Pass 2: sums of exp(L - shift) and of L - shift per column.
  for (int64_t r0 = 0; r0 < rows; r0 += FLUSH) {
    const int64_t r1 = std::min(rows, r0 + FLUSH);
    for (int64_t g = 0; g < groups; ++g) acc[g] = acc_s[g] = vsplat<wf>(0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = b + r * ld;
      for (int64_t g = 0; g < full; ++g) {
        const wf d = vload<wf>(xr + g * WL) - shift[g];
        acc[g] += vexp(d);
        acc_s[g] += d;
      }
      if (tail) {
        const wf d = vload_n<wf>(xr + full * WL, tail, -kInf) - shift[full];
        acc[full] += vexp(d);
        acc_s[full] += vsel(vlanes_below<wf>(tail), d, vsplat<wf>(0.0f));
      }
    }
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < WL && g * WL + i < cw; ++i) {
        cexp[g * WL + i] += acc[g][i];
        csum[g * WL + i] += acc_s[g][i];
      }
  }
  for (int64_t j = 0; j < cw; ++j) {
    run_sexp[j] += cexp[j];
    run_sum[j] += csum[j];
  }
}

struct RowPartial {
  float max;
  double sum;     // sum (x - lse_shift(max))
  double sumexp;  // sum exp(x - lse_shift(max))
};

RowPartial row_partial(float* x, int64_t n, float scale) {
  RowPartial p;
  scale_max(x, n, scale, &p.max);
  if (p.max != p.max) {
    p.sumexp = p.sum = static_cast<double>(kNaN);
  } else {
    sum_exp(x, n, lse_shift(p.max), &p.sumexp, &p.sum);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// float64 inputs (gradcheck): the same chunked algorithm written with ATen ops in float64.
// Correctness only; chunks still bound the memory (a few R x M float64 temporaries).

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
stats_f64(const at::Tensor& q, const at::Tensor& k, double sc, const at::Tensor& tgt,
          bool with_columns) {
  const int64_t N = q.size(0), M = k.size(0);
  const auto f64 = q.options().dtype(at::kDouble);
  const at::Tensor qd = q.contiguous(), kT = k.contiguous().t();
  at::Tensor row_logsum = at::empty({N}, f64), row_max = at::empty({N}, f64),
             row_ssum = at::empty({N}, f64), pos = at::empty({N}, f64);
  const int64_t MC = with_columns ? M : 0;
  at::Tensor run_max = at::full({MC}, -std::numeric_limits<double>::infinity(), f64);
  at::Tensor run_sexp = at::zeros({MC}, f64), run_sum = at::zeros({MC}, f64);
  const int64_t R = chunk_rows(N, M);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor L = at::mm(qd.narrow(0, r0, rc), kT).mul_(sc);
    const at::Tensor mx = std::get<0>(L.max(1));  // max propagates NaN
    const at::Tensor shifted = L - lse_shift_t(mx).unsqueeze(1);
    row_max.narrow(0, r0, rc).copy_(mx);
    row_ssum.narrow(0, r0, rc).copy_(shifted.sum(1));
    row_logsum.narrow(0, r0, rc).copy_(at::exp(shifted).sum(1).log());
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
  at::Tensor col_logsum = at::where(at::isnan(run_max), run_max, at::log(run_sexp));
  at::Tensor col_ssum = run_sum - static_cast<double>(N) * lse_shift_t(run_max);
  return std::make_tuple(row_logsum, row_max, row_ssum, pos, col_logsum, run_max, col_ssum);
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
      for (int64_t c = 1; c < sp.segments; ++c) m = nan_max(m, p[c].max);
      const float shift = lse_shift(m);
      double se = 0.0, s = 0.0;
      for (int64_t c = 0; c < sp.segments; ++c) {
        const int64_t width = std::min(sp.width, M - c * sp.width);
        s += p[c].sum + static_cast<double>(width) * (static_cast<double>(lse_shift(p[c].max)) - shift);
        if (p[c].sumexp != 0.0) {
          se += sp.segments == 1
                    ? p[c].sumexp
                    : p[c].sumexp * std::exp(static_cast<double>(lse_shift(p[c].max)) - shift);
        }
      }
      const int64_t i = r0 + r;
      o_max[i] = m;
      o_sum[i] = static_cast<float>(s);
      o_lse[i] = (m != m) ? m : static_cast<float>(std::log(se));
      o_pos[i] = B[r * M + tp[i]];  // the same computed logit that fed row_max / col_max
    }

    // Columns: online log-sum-exp merge into the running statistics.
    if (with_columns) {
      const int64_t nblk = ceil_div(M, COL_BLOCK);
      const int64_t grain = std::max<int64_t>(1, GRAIN_ELEMS / (rc * COL_BLOCK));
      at::parallel_for(0, nblk, grain, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t c0 = blk * COL_BLOCK, cw = std::min(COL_BLOCK, M - c0);
          column_block(B + c0, rc, M, cw, r0, run_max.data() + c0, run_sexp.data() + c0,
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
      c_lse[j] = (m != m) ? m : static_cast<float>(std::log(run_sexp[j]));
    }
  }
  return std::make_tuple(row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum);
}

}  // namespace mmkernels
