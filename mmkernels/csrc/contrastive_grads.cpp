// mmkernels: blockwise contrastive gradients on the CPU (the backward of contrastive.cpp).
//
// Each chunk of rows recomputes S = q_rows @ k^T into one reused R x M float32 buffer, turns it
// in place into scale * G with a fused, vectorised loop (accumulating sum(G * S) in double for
// dscale) and feeds it to two GEMMs: the chunk's dq rows and the dk accumulation. float64 inputs
// (gradcheck) take a plain ATen float64 version. The contract is in mmkernels/contrastive/ops.py.

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

// Backward, one row segment: x holds S on entry and scale * G on exit (without the one-hot
// g_pos term, added by the caller). Returns sum_j G[j] * S[j], accumulated in double.
// The row softmax is exp((L - shift) - logsum), the column one exp((L - c_shift) - c_logsum):
// the shift (the max) is subtracted first, exactly, so logits in the thousands keep the
// softmax's relative error at the rounding of L - shift, not at that of a rounded lse.
template <bool COLS>
CPU_MATH_INLINE double grad_segment(float* x, int64_t n, float scale, float g_lse, float shift,
                                    float lse, float g_sum, const float* gc_lse,
                                    const float* c_shift, const float* c_lse, const float* gc_sum) {
  DoubleAcc acc;
  int64_t j = 0;
  for (; j + WL <= n; j += WL) {
    const wf s = vload<wf>(x + j);
    const wf l = logit(scale, s);
    wf g = g_lse * vexp((l - shift) - lse) + g_sum;
    if constexpr (COLS) {
      g = g + vload<wf>(gc_lse + j) * vexp((l - vload<wf>(c_shift + j)) - vload<wf>(c_lse + j)) +
          vload<wf>(gc_sum + j);
    }
    add_products(acc, g, s);
    vstore(x + j, g * scale);
  }
  if (j < n) {  // tail, fewer than WL elements; padded lanes contribute 0
    const int64_t k = n - j;
    const wf s = vload_n<wf>(x + j, k, 0.0f);
    const wf l = logit(scale, s);
    wf g = g_lse * vexp((l - shift) - lse) + g_sum;
    if constexpr (COLS) {
      g = g + vload_n<wf>(gc_lse + j, k, 0.0f) *
                  vexp((l - vload_n<wf>(c_shift + j, k, 0.0f)) - vload_n<wf>(c_lse + j, k, 0.0f)) +
          vload_n<wf>(gc_sum + j, k, 0.0f);
    }
    add_products(acc, vsel(vlanes_below<wf>(k), g, vsplat<wf>(0.0f)), s);
    vstore_n(x + j, g * scale, k);
  }
  return total(acc);
}

CPU_MATH_MULTIVERSION
double grad_row_terms(float* x, int64_t n, float scale, float g_lse, float shift, float lse,
                      float g_sum) {
  return grad_segment<false>(x, n, scale, g_lse, shift, lse, g_sum, nullptr, nullptr, nullptr,
                             nullptr);
}

CPU_MATH_MULTIVERSION
double grad_row_col_terms(float* x, int64_t n, float scale, float g_lse, float shift, float lse,
                          float g_sum, const float* gc_lse, const float* c_shift,
                          const float* c_lse, const float* gc_sum) {
  return grad_segment<true>(x, n, scale, g_lse, shift, lse, g_sum, gc_lse, c_shift, c_lse,
                            gc_sum);
}

// float64 inputs (gradcheck): the same chunked algorithm written with ATen ops in float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
grads_f64(const at::Tensor& q, const at::Tensor& k, double sc, const at::Tensor& tgt,
          const at::Tensor& rs, const at::Tensor& rl, const at::Tensor& cs, const at::Tensor& cl,
          const at::Tensor& grl, const at::Tensor& grs,
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
    at::Tensor G = at::exp((L - rs.narrow(0, r0, rc).unsqueeze(1)) - rl.narrow(0, r0, rc).unsqueeze(1)) *
                       grl.narrow(0, r0, rc).unsqueeze(1) +
                   grs.narrow(0, r0, rc).unsqueeze(1);
    if (cols) G = G + at::exp((L - cs.unsqueeze(0)) - cl.unsqueeze(0)) * gcl.unsqueeze(0) + gcs.unsqueeze(0);
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
// Backward.

std::tuple<at::Tensor, at::Tensor, at::Tensor>
contrastive_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& targets, const at::Tensor& row_max,
                  const at::Tensor& row_logsum, const at::Tensor& col_max,
                  const at::Tensor& col_logsum, const at::Tensor& g_row_lse,
                  const at::Tensor& g_row_sum, const at::Tensor& g_pos,
                  const at::Tensor& g_col_lse, const at::Tensor& g_col_sum) {
  check_features(q, k);
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  TORCH_CHECK(M > 0 || N == 0, "mmkernels contrastive: k has no rows but q has ", N);
  const at::Tensor tgt = read_targets(targets, N, M);

  TORCH_CHECK(col_max.defined() && col_logsum.defined() && g_col_lse.defined() &&
                  g_col_sum.defined(),
              "mmkernels contrastive: col_max, col_logsum, g_col_lse, g_col_sum must be defined "
              "(empty [0] tensors when there are no column terms)");
  const bool cols = col_max.numel() != 0 || col_logsum.numel() != 0 || g_col_lse.numel() != 0 ||
                    g_col_sum.numel() != 0;
  const int64_t MC = cols ? M : 0;
  // Statistics and upstream gradients in the compute dtype: float32, or float64 for float64 input.
  const bool f64 = q.scalar_type() == at::kDouble;
  const at::ScalarType vt = f64 ? at::kDouble : at::kFloat;
  // the shifts: the maxima where finite, else 0 (as the forward subtracted them)
  const at::Tensor rs = lse_shift_t(read_vector(row_max, N, "row_max", vt));
  const at::Tensor rl = read_vector(row_logsum, N, "row_logsum", vt);
  const at::Tensor grl = read_vector(g_row_lse, N, "g_row_lse", vt);
  const at::Tensor grs = read_vector(g_row_sum, N, "g_row_sum", vt);
  const at::Tensor gp = read_vector(g_pos, N, "g_pos", vt);
  const at::Tensor cs = lse_shift_t(read_vector(col_max, MC, "col_max", vt));
  const at::Tensor cl = read_vector(col_logsum, MC, "col_logsum", vt);
  const at::Tensor gcl = read_vector(g_col_lse, MC, "g_col_lse", vt);
  const at::Tensor gcs = read_vector(g_col_sum, MC, "g_col_sum", vt);
  if (f64) return grads_f64(q, k, read_scale_f64(scale), tgt, rs, rl, cs, cl, grl, grs, gp, gcl, gcs, cols);
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
  const float* p_rs = rs.data_ptr<float>();
  const float* p_rl = rl.data_ptr<float>();
  const float* p_grl = grl.data_ptr<float>();
  const float* p_grs = grs.data_ptr<float>();
  const float* p_gp = gp.data_ptr<float>();
  const float* p_cs = cols ? cs.data_ptr<float>() : nullptr;
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
            cols ? grad_row_col_terms(x, c1 - c0, sc, p_grl[i], p_rs[i], p_rl[i], p_grs[i],
                                      p_gcl + c0, p_cs + c0, p_cl + c0, p_gcs + c0)
                 : grad_row_terms(x, c1 - c0, sc, p_grl[i], p_rs[i], p_rl[i], p_grs[i]);
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
