// mmkernels: per-modality ("multiway") LayerNorm on the CPU (VLMo norm2_text / norm2_imag /
// norm2_vl, BEiT-3 multiway LayerNorms). The definition of correct is
// mmkernels.experts.layer_norm.reference.modality_layer_norm_reference.
//
// Routing as the grouped GEMM's (experts.h): slot s of the sorted order holds token
// perm[s], expert e owns slots offsets[e] .. offsets[e+1]-1. A LayerNorm is row-local, so no rows
// are gathered: every pass reads x / dy rows in place (any strides), through perm.
//
// * Forward and dx: at::parallel_for over slots; each task converts one row at a time into a small
//   compute-type scratch (2 rows) and writes the result row to its token. mean / rstd are saved
//   per token ([T], compute type) for the backward.
// * dw / db, per expert: at::parallel_for over blocks of CB columns; a task owns its columns and
//   walks the expert's slots in order, summing dy * xhat and dy in double on the stack. The
//   summation order does not depend on the thread count (deterministic) and nothing is reduced
//   across threads. Experts outside the dw_experts mask, and experts without tokens, get zero
//   slices and no work.
// float32 / bfloat16 / float16 compute in float32, float64 in float64.

#include "experts_layer_norm.h"
#include "experts_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

// cpu_math.h's softmax row loops are static and not used here; the pop also drops the header's
// -Wpsabi exemption, restored below for the same reason (vf only passed between inline helpers).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "cpu_math.h"
#pragma GCC diagnostic pop
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mmkernels {
namespace {

using cpu_math::ceil_div;
using namespace experts_common;  // Route, make_route, check_2d, check_mask, row_grain, compute_type

constexpr int64_t CB = 128;  // dw / db columns per work item

// ----------------------------------------------------------------------------- checks

#define LN_CHECK(cond, ...) TORCH_CHECK(cond, "mmkernels experts_layer_norm: ", __VA_ARGS__)

void check_1d(const at::Tensor& t, const char* name, int64_t n) {
  LN_CHECK(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor");
  LN_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
}

struct Dims {
  int64_t T, H, E;
};

// x [T, H] (float32 / float64 / bfloat16 / float16, H >= 1), weight [E, H], bias [E, H] or None.
Dims check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  LN_CHECK(x.defined() && x.dim() == 2, "x must be 2-D [T, H], got ",
           x.defined() ? x.sizes() : at::IntArrayRef{});
  const auto st = x.scalar_type();
  LN_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
           "x must be float32, float64, bfloat16 or float16, got ", st);
  Dims d{x.size(0), x.size(1), 0};
  LN_CHECK(d.H >= 1, "x must have at least one feature (H >= 1)");
  check_2d(x, "x", d.T, d.H);
  LN_CHECK(weight.defined() && weight.dim() == 2, "weight must be 2-D [E, H], got ",
           weight.defined() ? weight.sizes() : at::IntArrayRef{});
  d.E = weight.size(0);
  check_2d(weight, "weight", d.E, d.H);
  if (bias.has_value() && bias->defined()) check_2d(*bias, "bias", d.E, d.H);
  return d;
}

// ----------------------------------------------------------------------------- row math

// dst[j] = src[j * stride] converted to the compute type.
template <typename scalar_t, typename CT>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, CT* dst) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<CT>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<CT>(src[j * stride]);
  }
}

// (sum_j a[j], sum_j a[j] * b[j]). float32 keeps 8 partial sums per lane (cpu_math's vf),
// which is both faster and more accurate than one running sum; float64 runs the plain loop.
template <typename T>
CPU_MATH_INLINE std::pair<T, T> row_sums_from(const T* a, const T* b, int64_t j, int64_t n, T s1, T s2) {
  for (; j < n; ++j) {
    s1 += a[j];
    s2 += a[j] * b[j];
  }
  return {s1, s2};
}
CPU_MATH_MULTIVERSION static std::pair<float, float> row_sums(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float s1 = 0.0f, s2 = 0.0f;
#if CPU_MATH_VEC
  using namespace cpu_math;
  vf v1 = vsplat(0.0f), v2 = vsplat(0.0f);
  for (; j + VL <= n; j += VL) {
    const vf x = vload(a + j);
    v1 += x;
    v2 += x * vload(b + j);
  }
  for (int l = 0; l < VL; ++l) {
    s1 += v1[l];
    s2 += v2[l];
  }
#endif
  return row_sums_from(a, b, j, n, s1, s2);
}
inline std::pair<double, double> row_sums(const double* a, const double* b, int64_t n) {
  return row_sums_from(a, b, 0, n, 0.0, 0.0);
}

}  // namespace

// ----------------------------------------------------------------------------- forward

std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_layer_norm_fwd(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps) {
  c10::NoGradGuard no_grad;
  const Dims d = check_inputs(x, weight, bias);
  const int64_t T = d.T, H = d.H;
  const Route rt = make_route(perm, offsets, T, d.E);
  const auto ct = compute_type(x.scalar_type());
  at::Tensor y = at::empty({T, H}, x.options());
  at::Tensor mean = at::empty({T}, x.options().dtype(ct));
  at::Tensor rstd = at::empty({T}, x.options().dtype(ct));
  if (T == 0) return {y, mean, rstd};
  // The affine parameters, [E, H] contiguous in the compute type (small).
  const at::Tensor w = weight.to(ct).contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(ct).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_layer_norm_fwd", [&] {
    using CT = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
    const CT* wp = w.data_ptr<CT>();
    const CT* bp = b.defined() ? b.data_ptr<CT>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    CT* mp = mean.data_ptr<CT>();
    CT* rp = rstd.data_ptr<CT>();
    const CT ceps = static_cast<CT>(eps);
    at::parallel_for(0, T, row_grain(H), [&](int64_t lo, int64_t hi) {
      std::vector<CT> buf(H);
      CT* v = buf.data();
      int64_t e = rt.expert_of(lo);
      for (int64_t s = lo; s < hi; ++s) {
        while (s >= rt.offsets[e + 1]) ++e;
        const int64_t t = rt.p[s];
        load_row(xp + t * xs0, xs1, H, v);
        const CT mu = row_sums(v, v, H).first / static_cast<CT>(H);
        for (int64_t j = 0; j < H; ++j) v[j] -= mu;  // centred: var is a sum of squares
        const CT r = CT(1) / std::sqrt(row_sums(v, v, H).second / static_cast<CT>(H) + ceps);
        mp[t] = mu;
        rp[t] = r;
        const CT* we = wp + e * H;
        scalar_t* yr = yp + t * H;
        if (bp) {
          const CT* be = bp + e * H;
          for (int64_t j = 0; j < H; ++j) yr[j] = static_cast<scalar_t>(v[j] * r * we[j] + be[j]);
        } else {
          for (int64_t j = 0; j < H; ++j) yr[j] = static_cast<scalar_t>(v[j] * r * we[j]);
        }
      }
    });
  });
  return {y, mean, rstd};
}

// ----------------------------------------------------------------------------- backward

std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_layer_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& perm,
                       const at::Tensor& offsets, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in,
                       const at::Tensor& rstd_in, bool needs_dx, const std::vector<bool>& dw_experts) {
  c10::NoGradGuard no_grad;
  const Dims d = check_inputs(x, weight, bias);
  const int64_t T = d.T, H = d.H, E = d.E;
  check_2d(dy_in, "dy", T, H);
  check_1d(mean_in, "mean", T);
  check_1d(rstd_in, "rstd", T);
  const bool needs_dw = check_mask(dw_experts, E, "dw_experts");
  const bool has_bias = bias.has_value() && bias->defined();
  const Route rt = make_route(perm, offsets, T, E);
  const auto st = x.scalar_type();
  const auto ct = compute_type(st);
  const at::Tensor dy = dy_in.scalar_type() == st ? dy_in : dy_in.to(st);
  const at::Tensor mean = mean_in.to(ct).contiguous(), rstd = rstd_in.to(ct).contiguous();
  const auto empty0 = [](const at::Tensor& like) { return at::empty({0}, like.options()); };

  at::Tensor dx = needs_dx ? at::empty({T, H}, x.options()) : empty0(x);
  // dw / db are summed into double [E, H] accumulators (zero for experts not computed), then
  // converted to the parameters' dtypes.
  at::Tensor dw_acc = needs_dw ? at::zeros({E, H}, x.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor db_acc = needs_dw && has_bias ? at::zeros({E, H}, x.options().dtype(at::kDouble)) : at::Tensor();
  if (T > 0 && (needs_dx || needs_dw)) {
    const at::Tensor w = weight.to(ct).contiguous();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "experts_layer_norm_bwd", [&] {
      using CT = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = dy.data_ptr<scalar_t>();
      const int64_t xs0 = x.stride(0), xs1 = x.stride(1), gs0 = dy.stride(0), gs1 = dy.stride(1);
      const CT* mp = mean.data_ptr<CT>();
      const CT* rp = rstd.data_ptr<CT>();

      // dx[t] = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)), g = dy * weight[e].
      if (needs_dx) {
        const CT* wp = w.data_ptr<CT>();
        scalar_t* dxp = dx.data_ptr<scalar_t>();
        const CT inv_h = CT(1) / static_cast<CT>(H);
        at::parallel_for(0, T, row_grain(H), [&](int64_t lo, int64_t hi) {
          std::vector<CT> buf(2 * H);
          CT* xh = buf.data();  // xhat
          CT* g = xh + H;
          int64_t e = rt.expert_of(lo);
          for (int64_t s = lo; s < hi; ++s) {
            while (s >= rt.offsets[e + 1]) ++e;
            const int64_t t = rt.p[s];
            const CT mu = mp[t], r = rp[t];
            const CT* we = wp + e * H;
            load_row(xp + t * xs0, xs1, H, xh);
            load_row(gp + t * gs0, gs1, H, g);
            for (int64_t j = 0; j < H; ++j) {
              xh[j] = (xh[j] - mu) * r;
              g[j] *= we[j];
            }
            const auto sums = row_sums(g, xh, H);
            const CT c1 = sums.first * inv_h, c2 = sums.second * inv_h;
            scalar_t* dr = dxp + t * H;
            for (int64_t j = 0; j < H; ++j) dr[j] = static_cast<scalar_t>(r * (g[j] - c1 - xh[j] * c2));
          }
        });
      }

      // dw[e, j] = sum_t dy[t, j] * xhat[t, j], db[e, j] = sum_t dy[t, j] over expert e's tokens.
      for (int64_t e = 0; e < E && needs_dw; ++e) {
        const int64_t s0 = rt.offsets[e], s1 = rt.offsets[e + 1];
        if (!dw_experts[e] || s0 == s1) continue;  // zero slice, no work
        double* dwe = dw_acc.data_ptr<double>() + e * H;
        double* dbe = db_acc.defined() ? db_acc.data_ptr<double>() + e * H : nullptr;
        at::parallel_for(0, ceil_div(H, CB), 1, [&](int64_t lo, int64_t hi) {
          double aw[CB], ab[CB];
          for (int64_t blk = lo; blk < hi; ++blk) {
            const int64_t j0 = blk * CB, n = std::min(CB, H - j0);
            std::fill(aw, aw + n, 0.0);
            std::fill(ab, ab + n, 0.0);
            for (int64_t s = s0; s < s1; ++s) {
              const int64_t t = rt.p[s];
              const CT mu = mp[t], r = rp[t];
              const scalar_t* xr = xp + t * xs0 + j0 * xs1;
              const scalar_t* gr = gp + t * gs0 + j0 * gs1;
              for (int64_t j = 0; j < n; ++j) {
                const CT gj = static_cast<CT>(gr[j * gs1]);
                aw[j] += static_cast<double>(gj * ((static_cast<CT>(xr[j * xs1]) - mu) * r));
                ab[j] += static_cast<double>(gj);
              }
            }
            std::copy(aw, aw + n, dwe + j0);
            if (dbe) std::copy(ab, ab + n, dbe + j0);
          }
        });
      }
    });
  }
  at::Tensor dw = needs_dw ? dw_acc.to(weight.scalar_type()) : empty0(weight);
  at::Tensor db = needs_dw && has_bias ? db_acc.to(bias->scalar_type()) : (has_bias ? empty0(*bias) : empty0(weight));
  return {dx, dw, db};
}

}  // namespace mmkernels
