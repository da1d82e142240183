// mmkernels: the SigLIP sigmoid loss on the CPU, forward (per-row losses) and backward.
//
// The logits L = scale * q @ k^T + bias are never materialised: rows are processed in chunks of R
// rows (R * M <= BUDGET floats, the contrastive kernels' chunking), S = q_rows @ k^T goes through
// BLAS into one reused R x M float32 buffer, and one fused, vectorised loop per row segment turns
// it into the chunk's row losses (forward) or, in place, into scale * G, which two more GEMMs turn
// into the chunk's dq rows and its share of dk (backward). bf16/fp16 inputs are converted to
// float32 once (O(N*D)); float64 inputs (gradcheck) take a plain ATen float64 version of the same
// chunked algorithm. The exact contract is in mmkernels/contrastive/siglip/ops.py.

#include "siglip.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "contrastive_internal.h"

namespace mmkernels {
namespace {

using namespace contrastive_detail;

constexpr const char* kSiglip = "mmkernels siglip";

// ---------------------------------------------------------------------------------------------
// Vector helpers.

// -|a| lane by lane (the sign bit set).
CPU_MATH_INLINE wf vneg_abs(const wf& a) { return vbits<wf>(vbits<wu>(a) | 0x80000000u); }

// softplus(a) = log(1 + exp(a)) = max(a, 0) + log1p(exp(-|a|)), stable for every a. With
// u = exp(-|a|) in [0, 1], log1p(u) = 2 atanh(s) for s = u / (2 + u) in [0, 1/3]; the atanh series
// s + s^3/3 + ... + s^15/15 is within 2e-9 relative of it there (far below float32's rounding).
// NaN gives NaN; +-inf give inf and 0.
CPU_MATH_INLINE wf vsoftplus(const wf& a) {
  const wf u = vexp(vneg_abs(a));
  const wf s = u / (u + 2.0f);
  const wf t = s * s;
  wf p = vsplat<wf>(1.0f / 15.0f);
  p = p * t + 1.0f / 13.0f;
  p = p * t + 1.0f / 11.0f;
  p = p * t + 1.0f / 9.0f;
  p = p * t + 1.0f / 7.0f;
  p = p * t + 1.0f / 5.0f;
  p = p * t + 1.0f / 3.0f;
  p = p * t + 1.0f;
  return vsel(a > 0.0f, a, vsplat<wf>(0.0f)) + (s + s) * p;
}

// sigmoid(a) = 1 / (1 + exp(-a)): relatively accurate on both tails (exp(-a) = inf gives 0).
CPU_MATH_INLINE wf vsigmoid(const wf& a) { return 1.0f / (vexp(-a) + 1.0f); }

// The lane indices 0, 1, ..., WL - 1.
CPU_MATH_INLINE wi lane_ids() {
  wi idx;
  for (int i = 0; i < WL; ++i) idx[i] = i;
  return idx;
}

// Every lane holds the lane of column `pos` in the vector that starts at column j, or -1 when
// that vector does not hold it (compared with lane_ids(), it gives the positive's mask).
CPU_MATH_INLINE wi target_lane(int64_t pos, int64_t j) {
  const int64_t r = pos - j;
  return wi{} + static_cast<int32_t>((r >= 0 && r < WL) ? r : -1);
}

// The lanes of a wf added to a double accumulator.
CPU_MATH_INLINE void add_values(DoubleAcc& acc, const wf& a) {
  wf_half a0, a1;
  __builtin_memcpy(&a0, &a, sizeof(a0));
  __builtin_memcpy(&a1, reinterpret_cast<const char*>(&a) + sizeof(a0), sizeof(a1));
  acc.lo += __builtin_convertvector(a0, wd_half);
  acc.hi += __builtin_convertvector(a1, wd_half);
}

// ---------------------------------------------------------------------------------------------
// The hot loops (multiversioned). A row segment holds n entries S_j = q_i . k_j; `pos` is the
// column of the row's positive relative to the segment (any value outside [0, n): none here).

// Forward: sum_j softplus(-z_j L_j), L_j = scale * S_j + bias, z_j = +1 at pos, else -1.
CPU_MATH_MULTIVERSION
double loss_segment(const float* x, int64_t n, int64_t pos, float scale, float bias) {
  const wi lanes = lane_ids();
  double sum = 0.0;
  int64_t j = 0;
  while (j < n) {
    wf acc = vsplat<wf>(0.0f);
    const int64_t stop = std::min(n, j + FLUSH * WL);
    for (; j + WL <= stop; j += WL) {
      const wf l = vload<wf>(x + j) * scale + bias;
      acc += vsoftplus(vsel(lanes == target_lane(pos, j), -l, l));
    }
    if (j < stop) {  // tail of the row, fewer than WL elements
      const int64_t k = stop - j;
      const wf l = vload_n<wf>(x + j, k, 0.0f) * scale + bias;
      const wf sp = vsoftplus(vsel(lanes == target_lane(pos, j), -l, l));
      acc += vsel(vlanes_below<wf>(k), sp, vsplat<wf>(0.0f));
      j = stop;
    }
    sum += vhsum(acc);
  }
  return sum;
}

struct GradSums {
  double gs;    // sum_j G_j * S_j
  double g;     // sum_j G_j
  double loss;  // sum_j softplus(-z_j L_j), when asked for (else 0)
};

// Backward: x holds S on entry and scale * G on exit, G_j = -g z_j sigmoid(-z_j L_j). WITH_LOSS:
// also the forward's sum (the fused forward + backward of a scalar loss).
// (Inlined into the two multiversioned entry points below: target_clones takes no templates.)
template <bool WITH_LOSS>
CPU_MATH_INLINE GradSums grad_segment_impl(float* x, int64_t n, int64_t pos, float scale,
                                           float bias, float g) {
  const wi lanes = lane_ids();
  DoubleAcc gs, gsum, lsum;
  int64_t j = 0;
  for (; j + WL <= n; j += WL) {
    const wf s = vload<wf>(x + j);
    const wf l = s * scale + bias;
    const wi positive = lanes == target_lane(pos, j);
    const wf a = vsel(positive, -l, l);
    const wf w = g * vsigmoid(a);
    const wf G = vsel(positive, -w, w);
    add_products(gs, G, s);
    add_values(gsum, G);
    if (WITH_LOSS) add_values(lsum, vsoftplus(a));
    vstore(x + j, G * scale);
  }
  if (j < n) {  // tail, fewer than WL elements; padded lanes contribute 0
    const int64_t k = n - j;
    const wf s = vload_n<wf>(x + j, k, 0.0f);
    const wf l = s * scale + bias;
    const wi positive = lanes == target_lane(pos, j);
    const wf a = vsel(positive, -l, l);
    const wf w = g * vsigmoid(a);
    const wf G = vsel(vlanes_below<wf>(k), vsel(positive, -w, w), vsplat<wf>(0.0f));
    add_products(gs, G, s);
    add_values(gsum, G);
    if (WITH_LOSS) add_values(lsum, vsel(vlanes_below<wf>(k), vsoftplus(a), vsplat<wf>(0.0f)));
    vstore_n(x + j, G * scale, k);
  }
  return {total(gs), total(gsum), WITH_LOSS ? total(lsum) : 0.0};
}

CPU_MATH_MULTIVERSION
GradSums grad_segment(float* x, int64_t n, int64_t pos, float scale, float bias, float g) {
  return grad_segment_impl<false>(x, n, pos, scale, bias, g);
}

CPU_MATH_MULTIVERSION
GradSums grad_loss_segment(float* x, int64_t n, int64_t pos, float scale, float bias, float g) {
  return grad_segment_impl<true>(x, n, pos, scale, bias, g);
}

// ---------------------------------------------------------------------------------------------
// float64 inputs (gradcheck): the same chunked algorithm written with ATen ops in float64.
// Correctness only; chunks still bound the memory (a few R x M float64 temporaries).

// The chunk's signed logits a = -z * L and the positives' mask.
std::pair<at::Tensor, at::Tensor> signed_logits_f64(const at::Tensor& S, double sc, double bi,
                                                    const at::Tensor& cols,
                                                    const at::Tensor& tgt_rows) {
  const at::Tensor L = S * sc + bi;
  const at::Tensor positive = cols.unsqueeze(0) == tgt_rows.unsqueeze(1);
  return {at::where(positive, -L, L), positive};
}

at::Tensor rows_f64(const at::Tensor& q, const at::Tensor& k, double sc, double bi,
                    const at::Tensor& tgt) {
  const int64_t N = q.size(0), M = k.size(0);
  const at::Tensor qd = q.contiguous(), kT = k.contiguous().t();
  const at::Tensor cols = at::arange(M, tgt.options());
  at::Tensor out = at::empty({N}, q.options().dtype(at::kDouble));
  const int64_t R = chunk_rows(N, M);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor a =
        signed_logits_f64(at::mm(qd.narrow(0, r0, rc), kT), sc, bi, cols, tgt.narrow(0, r0, rc))
            .first;
    out.narrow(0, r0, rc).copy_((at::clamp_min(a, 0) + at::log1p(at::exp(-a.abs()))).sum(1));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grads_f64(const at::Tensor& q, const at::Tensor& k, double sc, double bi, const at::Tensor& tgt,
          const at::Tensor& g_row) {
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  const auto f64 = q.options().dtype(at::kDouble);
  const at::Tensor qd = q.contiguous(), kd = k.contiguous();
  const at::Tensor cols = at::arange(M, tgt.options());
  at::Tensor dq = at::empty({N, D}, f64), dk = at::zeros({M, D}, f64);
  at::Tensor dscale = at::zeros({}, f64), dbias = at::zeros({}, f64);
  const int64_t R = chunk_rows(N, M);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    const at::Tensor q_rows = qd.narrow(0, r0, rc);
    const at::Tensor S = at::mm(q_rows, kd.t());
    const auto [a, positive] = signed_logits_f64(S, sc, bi, cols, tgt.narrow(0, r0, rc));
    const at::Tensor w = at::sigmoid(a) * g_row.narrow(0, r0, rc).unsqueeze(1);
    const at::Tensor G = at::where(positive, -w, w);
    dscale.add_((G * S).sum());
    dbias.add_(G.sum());
    at::Tensor dq_rows = dq.narrow(0, r0, rc);
    at::mm_out(dq_rows, G, kd).mul_(sc);
    dk.addmm_(G.t(), q_rows, /*beta=*/1, /*alpha=*/sc);
  }
  return std::make_tuple(dq, dk, dscale, dbias);
}

struct Inputs {
  int64_t N, M, D;
  at::Tensor tgt;  // contiguous int64 [N]
};

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& targets) {
  check_features(q, k, kSiglip);
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  return {N, M, D, read_targets(targets, N, M, /*allow_none=*/true, kSiglip)};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward.

at::Tensor siglip_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                       const at::Tensor& bias, const at::Tensor& targets, bool bf16_gemm) {
  const Inputs in = check_inputs(q, k, targets);
  const int64_t N = in.N, M = in.M;
  if (q.scalar_type() == at::kDouble) {
    return rows_f64(q, k, read_scale_f64(scale, "scale", kSiglip),
                    read_scale_f64(bias, "bias", kSiglip), in.tgt);
  }
  const float sc = read_scale(scale, "scale", kSiglip);
  const float bi = read_scale(bias, "bias", kSiglip);

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({N}, f32);
  const bool native = bf16_gemm && q.scalar_type() == at::kBFloat16;
  const at::Tensor qf = native ? q.contiguous() : to_f32_contiguous(q);
  const at::Tensor kT = (native ? k.contiguous() : to_f32_contiguous(k)).t();
  const int64_t* tp = in.tgt.data_ptr<int64_t>();
  float* out = row_loss.data_ptr<float>();

  const int64_t R = chunk_rows(N, M);
  at::Tensor buf = at::empty({R, std::max<int64_t>(M, 1)}, f32);
  std::vector<double> parts;

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    at::Tensor chunk = buf.narrow(0, 0, rc).narrow(1, 0, M);  // contiguous [rc, M]
    if (native) {
      chunk.copy_(at::mm(qf.narrow(0, r0, rc), kT));
    } else {
      at::mm_out(chunk, qf.narrow(0, r0, rc), kT);
    }
    const float* B = chunk.data_ptr<float>();

    const RowSplit sp = split_rows(rc, M);
    parts.resize(static_cast<size_t>(rc * sp.segments));
    at::parallel_for(0, rc * sp.segments, sp.grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / sp.segments, c0 = (it % sp.segments) * sp.width;
        const int64_t c1 = std::min(M, c0 + sp.width);
        parts[it] = loss_segment(B + r * M + c0, c1 - c0, tp[r0 + r] - c0, sc, bi);
      }
    });
    for (int64_t r = 0; r < rc; ++r) {
      double s = 0.0;
      for (int64_t c = 0; c < sp.segments; ++c) s += parts[r * sp.segments + c];
      out[r0 + r] = static_cast<float>(s);
    }
  }
  return row_loss;
}

// ---------------------------------------------------------------------------------------------
// Backward.

// The float32 chunked backward (bf16/fp16/fp32 inputs): the gradients for g_row (pg, float32
// [N]) and, when rows is given (float32 [N]), each row's loss from the same logits.
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grads_f32(const at::Tensor& q, const at::Tensor& k, const Inputs& in, float sc, float bi,
          const at::Tensor& gr, bool bf16_gemm, at::Tensor* rows) {
  const int64_t N = in.N, M = in.M, D = in.D;

  const auto f32 = q.options().dtype(at::kFloat);
  const bool native = bf16_gemm && q.scalar_type() == at::kBFloat16;
  const at::Tensor qf = native ? q.contiguous() : to_f32_contiguous(q);
  const at::Tensor kf = native ? k.contiguous() : to_f32_contiguous(k);
  const at::Tensor kT = kf.t();
  // dq rows are final after their chunk: written straight into the output (through one R x D
  // float32 staging buffer when the output is bf16/fp16). dk sums over chunks: float32 throughout.
  const bool dq_f32 = q.scalar_type() == at::kFloat;
  at::Tensor dq = at::empty({N, D}, q.options());
  at::Tensor dk = at::zeros({M, D}, f32);
  const int64_t* tp = in.tgt.data_ptr<int64_t>();
  const float* pg = gr.data_ptr<float>();
  float* out_rows = rows ? rows->data_ptr<float>() : nullptr;

  const int64_t R = chunk_rows(N, M);
  at::Tensor buf = at::empty({R, std::max<int64_t>(M, 1)}, f32);
  at::Tensor dq_stage = (dq_f32 || native) ? at::Tensor() : at::empty({std::min(R, N), D}, f32);
  std::vector<GradSums> parts;
  double dscale = 0.0, dbias = 0.0;

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rc = std::min(R, N - r0);
    at::Tensor chunk = buf.narrow(0, 0, rc).narrow(1, 0, M);
    const at::Tensor q_rows = qf.narrow(0, r0, rc);
    if (native) {
      chunk.copy_(at::mm(q_rows, kT));
    } else {
      at::mm_out(chunk, q_rows, kT);
    }
    float* B = chunk.data_ptr<float>();

    // S -> scale * G in place; sum(G * S) and sum(G) per work item.
    const RowSplit sp = split_rows(rc, M);
    parts.resize(static_cast<size_t>(rc * sp.segments));
    at::parallel_for(0, rc * sp.segments, sp.grain, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t r = it / sp.segments, c0 = (it % sp.segments) * sp.width;
        const int64_t c1 = std::min(M, c0 + sp.width);
        const int64_t i = r0 + r;
        parts[it] = out_rows
                        ? grad_loss_segment(B + r * M + c0, c1 - c0, tp[i] - c0, sc, bi, pg[i])
                        : grad_segment(B + r * M + c0, c1 - c0, tp[i] - c0, sc, bi, pg[i]);
      }
    });
    for (const GradSums& p : parts) {
      dscale += p.gs;
      dbias += p.g;
    }
    if (out_rows) {
      for (int64_t r = 0; r < rc; ++r) {
        double l = 0.0;
        for (int64_t c = 0; c < sp.segments; ++c) l += parts[r * sp.segments + c].loss;
        out_rows[r0 + r] = static_cast<float>(l);
      }
    }

    // dq rows = (scale G) @ k ; dk += (scale G)^T @ q_rows.
    if (native) {  // scale * G rounded to bf16 for the bf16 GEMMs
      const at::Tensor g16 = chunk.to(at::kBFloat16);
      at::Tensor dq_rows = dq.narrow(0, r0, rc);
      at::mm_out(dq_rows, g16, kf);
      dk.add_(at::mm(g16.t(), q_rows));
      continue;
    }
    at::Tensor dq_rows = dq_f32 ? dq.narrow(0, r0, rc) : dq_stage.narrow(0, 0, rc);
    at::mm_out(dq_rows, chunk, kf);
    if (!dq_f32) dq.narrow(0, r0, rc).copy_(dq_rows);
    dk.addmm_(chunk.t(), q_rows);
  }

  return std::make_tuple(dq, dk.to(k.scalar_type()),
                         at::scalar_tensor(static_cast<double>(static_cast<float>(dscale)), f32),
                         at::scalar_tensor(static_cast<double>(static_cast<float>(dbias)), f32));
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
             const at::Tensor& bias, const at::Tensor& targets, const at::Tensor& g_row,
             bool bf16_gemm) {
  const Inputs in = check_inputs(q, k, targets);
  const int64_t N = in.N, M = in.M, D = in.D;
  const bool f64 = q.scalar_type() == at::kDouble;
  const at::Tensor gr = read_vector(g_row, N, "g_row", f64 ? at::kDouble : at::kFloat, kSiglip);
  if (f64) {
    return grads_f64(q, k, read_scale_f64(scale, "scale", kSiglip),
                     read_scale_f64(bias, "bias", kSiglip), in.tgt, gr);
  }
  return grads_f32(q, k, in, read_scale(scale, "scale", kSiglip), read_scale(bias, "bias", kSiglip),
                   gr, bf16_gemm, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_fwd_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
               const at::Tensor& bias, const at::Tensor& targets, bool bf16_gemm) {
  const Inputs in = check_inputs(q, k, targets);
  if (q.scalar_type() == at::kDouble) {
    const double sc = read_scale_f64(scale, "scale", kSiglip);
    const double bi = read_scale_f64(bias, "bias", kSiglip);
    const at::Tensor ones = at::ones({in.N}, q.options().dtype(at::kDouble));
    auto g = grads_f64(q, k, sc, bi, in.tgt, ones);
    return std::make_tuple(rows_f64(q, k, sc, bi, in.tgt), std::get<0>(g), std::get<1>(g),
                           std::get<2>(g), std::get<3>(g));
  }
  at::Tensor rows = at::empty({in.N}, q.options().dtype(at::kFloat));
  const at::Tensor ones = at::ones({in.N}, q.options().dtype(at::kFloat));
  auto g = grads_f32(q, k, in, read_scale(scale, "scale", kSiglip), read_scale(bias, "bias", kSiglip),
                     ones, bf16_gemm, &rows);
  return std::make_tuple(rows, std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g));
}

}  // namespace mmkernels
