// mmkernels: modality-expert routing (VLMo/BEiT-3 multiway FFN, CogVLM visual expert) on the CPU.
//
// Tokens are routed by a stable sort computed by the caller: slot s of the sorted order holds
// token perm[s], and expert e owns slots offsets[e] .. offsets[e+1]-1 (see
// mmkernels/experts/grouped_mm/ops.py). No permuted copy of the activations is ever made: for each
// expert, its slot range is processed in chunks of at most MAX_CHUNK_ROWS (2048) rows. A chunk's input
// rows are gathered (through perm, any strides, converted to the compute type) into a reused
// contiguous scratch block, multiplied through BLAS (at::mm_out / addmm into float32 for
// bf16/fp16, natively for float32/float64), bias and activation are applied in one fused pass
// over the chunk, and the output rows are scattered back to token order. Scratch memory is
// O(chunk * width), independent of T.
// Backward: per chunk, the upstream rows are gathered, the activation derivative is evaluated
// from the saved pre-activation h (sorted order, so a chunk is a contiguous block of h and a),
// weight gradients accumulate over the expert's chunks (into the output directly when the weight
// dtype is the compute type, else into a per-expert float32 accumulator converted once at the
// end; bias gradients are column sums accumulated in double within a chunk), and input gradients
// are scattered back. Experts with no tokens, and experts outside a weight-gradient mask (frozen
// experts), get zero weight gradients and none of that work.
// float64 inputs (gradcheck) run the same code in float64.

#include "experts.h"
#include "experts_common.h"

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

namespace mmkernels {
namespace {

using namespace experts_common;

// Rows per chunk: at most MAX_CHUNK_ROWS, and a scratch buffer of at most CHUNK_ELEMS elements
// (but never fewer than MIN_CHUNK_ROWS rows, so very wide layers still get efficient GEMMs).
// Short row chunks cost BLAS much of its GEMM efficiency against one GEMM over all rows, and the
// loss shrinks as chunks grow, hence chunks of up to 2048 rows.
constexpr int64_t MAX_CHUNK_ROWS = 2048;
constexpr int64_t MIN_CHUNK_ROWS = 128;
constexpr int64_t CHUNK_ELEMS = int64_t(1) << 22;
inline int64_t chunk_rows(int64_t width) {
  const int64_t w = std::max<int64_t>(width, 1);
  return std::clamp<int64_t>(CHUNK_ELEMS / w, MIN_CHUNK_ROWS, MAX_CHUNK_ROWS);
}

enum class Act { Gelu, GeluTanh, Silu, Relu, Swiglu };

Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  if (name == "relu") return Act::Relu;
  if (name == "swiglu") return Act::Swiglu;
  TORCH_CHECK(false, "mmkernels experts: unknown activation '", name,
              "' (expected gelu, gelu_tanh, silu, relu or swiglu)");
  return Act::Gelu;  // unreachable
}

// ----------------------------------------------------------------------------- checks

void check_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.defined() && w.device().is_cpu(), "mmkernels experts (cpu kernel): ", name,
              " must be a CPU tensor");
  TORCH_CHECK(w.dim() == 3, "mmkernels experts: ", name, " must be 3-D [E, out, in], got ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "mmkernels experts: ", name, " must be floating");
}

// The bias (if any), checked to be [E, n].
at::Tensor check_bias(const c10::optional<at::Tensor>& b, const char* name, int64_t E, int64_t n) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  check_2d(*b, name, E, n);
  return *b;
}

// ----------------------------------------------------------------------------- gather / scatter

// dst [n, W] (contiguous, CT) = src[idx[r], :] for r < n; src [*, W] of any strides.
template <typename scalar_t, typename CT>
void gather_rows(const at::Tensor& src, const int32_t* idx, int64_t n, CT* dst) {
  const scalar_t* base = src.data_ptr<scalar_t>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1), W = src.size(1);
  at::parallel_for(0, n, row_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* row = base + static_cast<int64_t>(idx[r]) * s0;
      CT* d = dst + r * W;
      if (s1 == 1) {
        for (int64_t j = 0; j < W; ++j) d[j] = static_cast<CT>(row[j]);
      } else {
        for (int64_t j = 0; j < W; ++j) d[j] = static_cast<CT>(row[j * s1]);
      }
    }
  });
}

// dst[idx[r], :] = src[r, :] for r < n; src [n, W] contiguous CT, dst [*, W] contiguous.
template <typename CT, typename scalar_t>
void scatter_rows(const CT* src, const int32_t* idx, int64_t n, int64_t W, scalar_t* dst) {
  at::parallel_for(0, n, row_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      scalar_t* d = dst + static_cast<int64_t>(idx[r]) * W;
      const CT* s = src + r * W;
      for (int64_t j = 0; j < W; ++j) d[j] = static_cast<scalar_t>(s[j]);
    }
  });
}

// ----------------------------------------------------------------------------- activations

template <typename CT>
struct ActMath {
  static constexpr CT kSqrt1_2 = CT(0.70710678118654752440);     // 1 / sqrt(2)
  static constexpr CT kAlpha = CT(0.39894228040143267794);       // 1 / sqrt(2 pi)
  static constexpr CT kBeta = CT(0.79788456080286535588);        // sqrt(2 / pi)
  static constexpr CT kKappa = CT(0.044715);

  static inline CT sigmoid(CT x) { return CT(1) / (CT(1) + std::exp(-x)); }
  static inline CT gelu(CT x) { return CT(0.5) * x * (CT(1) + std::erf(x * kSqrt1_2)); }
  // 0.5 x (1 + tanh(u)) with u = kBeta (x + kKappa x^3), written as x * sigmoid(2u) (identical
  // mathematically, one exp instead of a tanh, and no cancellation in 1 + tanh(u)).
  static inline CT gelu_tanh(CT x) { return x * sigmoid(CT(2) * kBeta * (x + kKappa * x * x * x)); }
  static inline CT silu(CT x) { return x / (CT(1) + std::exp(-x)); }
  static inline CT relu(CT x) { return x <= CT(0) ? CT(0) : x; }  // NaN stays NaN

  // Derivatives (as ATen's gelu_backward / silu_backward / threshold_backward).
  static inline CT dgelu(CT x) {
    const CT cdf = CT(0.5) * (CT(1) + std::erf(x * kSqrt1_2));
    const CT pdf = std::exp(CT(-0.5) * x * x) * kAlpha;
    return cdf + x * pdf;
  }
  // 0.5 (1 + t) + 0.5 x (1 - t^2) kBeta (1 + 3 kKappa x^2) with t = tanh(u); with s = sigmoid(2u)
  // and 1 - s = sigmoid(-2u): s (1 + 2 x sigmoid(-2u) kBeta (1 + 3 kKappa x^2)). Both sigmoids
  // come from one exp(-|2u|), so 1 - s is never formed by cancellation (which 1 - t^2 and
  // 1 - s suffer for moderate |u|, where it costs several ulps of the derivative).
  static inline CT dgelu_tanh(CT x) {
    const CT x2 = x * x;
    const CT z = CT(2) * kBeta * (x + kKappa * x2 * x);
    const CT e = std::exp(-std::abs(z));
    const CT r = CT(1) / (CT(1) + e);
    const CT s = z >= CT(0) ? r : e * r;   // sigmoid(z)
    const CT sm = z >= CT(0) ? e * r : r;  // sigmoid(-z) = 1 - s
    return s * (CT(1) + CT(2) * x * sm * kBeta * (CT(1) + CT(3) * kKappa * x2));
  }
  static inline CT dsilu(CT x) {
    const CT s = sigmoid(x);
    return s * (CT(1) + x * (CT(1) - s));
  }
};

// One pass over a chunk of n rows: H [n, Fi] += bias (in place), A [n, F] = act(H). When h_out /
// a_out are given (16-bit outputs) the rows are also written there, converted.
template <typename scalar_t, typename CT>
void bias_act_fwd(CT* H, int64_t n, int64_t Fi, int64_t F, const CT* bias, Act act, scalar_t* h_out,
                  CT* A, scalar_t* a_out) {
  using M = ActMath<CT>;
  at::parallel_for(0, n, row_grain(Fi), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      CT* hr = H + r * Fi;
      CT* ar = A + r * F;
      if (bias) {
        for (int64_t j = 0; j < Fi; ++j) hr[j] += bias[j];
      }
      if (h_out) {
        scalar_t* ho = h_out + r * Fi;
        for (int64_t j = 0; j < Fi; ++j) ho[j] = static_cast<scalar_t>(hr[j]);
      }
      // ar[j] = f(hr[j]); f is a lambda (its own type), so each loop inlines its activation
      auto each = [&](auto f) { for (int64_t j = 0; j < F; ++j) ar[j] = f(hr[j]); };
      switch (act) {
        case Act::Gelu:
          each([](CT v) { return M::gelu(v); });
          break;
        case Act::GeluTanh:
          each([](CT v) { return M::gelu_tanh(v); });
          break;
        case Act::Silu:
          each([](CT v) { return M::silu(v); });
          break;
        case Act::Relu:
          each([](CT v) { return M::relu(v); });
          break;
        case Act::Swiglu:
          for (int64_t j = 0; j < F; ++j) ar[j] = M::silu(hr[j]) * hr[F + j];
          break;
      }
      if (a_out) {
        scalar_t* ao = a_out + r * F;
        for (int64_t j = 0; j < F; ++j) ao[j] = static_cast<scalar_t>(ar[j]);
      }
    }
  });
}

// dH [n, Fi] = dA [n, F] * act'(H), H [n, Fi] the saved pre-activation rows (contiguous).
template <typename scalar_t, typename CT>
void act_bwd(const CT* dA, const scalar_t* H, int64_t n, int64_t Fi, int64_t F, Act act, CT* dH) {
  using M = ActMath<CT>;
  at::parallel_for(0, n, row_grain(Fi), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const CT* g = dA + r * F;
      const scalar_t* hr = H + r * Fi;
      CT* d = dH + r * Fi;
      // d[j] = g[j] * act'(hr[j]) with act' a lambda, inlined in each loop
      auto each = [&](auto da) { for (int64_t j = 0; j < F; ++j) d[j] = g[j] * da(hr[j]); };
      switch (act) {
        case Act::Gelu:
          each([](CT v) { return M::dgelu(v); });
          break;
        case Act::GeluTanh:
          each([](CT v) { return M::dgelu_tanh(v); });
          break;
        case Act::Silu:
          each([](CT v) { return M::dsilu(v); });
          break;
        case Act::Relu:
          for (int64_t j = 0; j < F; ++j) d[j] = static_cast<CT>(hr[j]) <= CT(0) ? CT(0) : g[j];
          break;
        case Act::Swiglu:
          for (int64_t j = 0; j < F; ++j) {
            const CT gate = static_cast<CT>(hr[j]), up = static_cast<CT>(hr[F + j]);
            const CT s = M::sigmoid(gate);
            d[j] = g[j] * up * (s * (CT(1) + gate * (CT(1) - s)));
            d[F + j] = g[j] * (gate * s);
          }
          break;
      }
    }
  });
}

// out[j] (+)= sum_r M[r, j] for M [n, k] contiguous; each column summed in double (the sums
// run over up to a chunk of rows), then added to out in CT. first: out is overwritten.
template <typename CT>
void add_column_sums(const CT* M, int64_t n, int64_t k, CT* out, bool first) {
  constexpr int64_t CB = 128;
  const int64_t nblk = (k + CB - 1) / CB;
  at::parallel_for(0, nblk, 1, [&](int64_t lo, int64_t hi) {
    double acc[CB];
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t j0 = blk * CB, w = std::min(CB, k - j0);
      for (int64_t j = 0; j < w; ++j) acc[j] = 0.0;
      for (int64_t r = 0; r < n; ++r) {
        const CT* row = M + r * k + j0;
        for (int64_t j = 0; j < w; ++j) acc[j] += static_cast<double>(row[j]);
      }
      CT* o = out + j0;
      for (int64_t j = 0; j < w; ++j) o[j] = first ? static_cast<CT>(acc[j]) : o[j] + static_cast<CT>(acc[j]);
    }
  });
}

// Expert e's [out, in] weight in the compute type (a view when it already is).
inline at::Tensor expert_weight(const at::Tensor& w, int64_t e, at::ScalarType ct) {
  return w.select(0, e).to(ct);
}
inline at::Tensor expert_bias(const at::Tensor& b, int64_t e, at::ScalarType ct) {
  return b.defined() ? b.select(0, e).to(ct).contiguous() : at::Tensor();
}

// The gradient of one weight (or bias) for expert e, accumulated over the expert's chunks: into
// the output slice itself when it has the compute type, else into a compute-type scratch that
// finish() converts into the output. The output is allocated uninitialised: skip() zeroes the
// slice of an expert without tokens; the first chunk of an expert overwrites (beta = 0).
struct GradSlot {
  at::Tensor out;  // [E, ...] output (weight dtype), or undefined when not wanted
  at::Tensor scratch;
  at::Tensor cur;
  bool direct = false, first = true;
  GradSlot() = default;
  GradSlot(const at::Tensor& o, at::ScalarType ct) : out(o) {
    if (!out.defined()) return;
    direct = out.scalar_type() == ct;
    if (!direct) scratch = at::empty(out.sizes().slice(1), out.options().dtype(ct));
  }
  bool wanted() const { return out.defined(); }
  void skip(int64_t e) {
    if (wanted()) out.select(0, e).zero_();
  }
  void begin(int64_t e) {
    if (!wanted()) return;
    cur = direct ? out.select(0, e) : scratch;
    first = true;
  }
  // cur (+)= A @ B
  void add_mm(const at::Tensor& A, const at::Tensor& B) {
    cur.addmm_(A, B, /*beta=*/first ? 0 : 1, /*alpha=*/1);
    first = false;
  }
  // cur (+)= the column sums of M [n, k] (contiguous, compute type CT).
  template <typename CT>
  void add_colsum(const at::Tensor& M) {
    TORCH_CHECK(M.is_contiguous() && cur.is_contiguous() && M.size(1) == cur.numel(),
                "mmkernels experts: internal error (column sums)");
    add_column_sums<CT>(M.data_ptr<CT>(), M.size(0), M.size(1), cur.data_ptr<CT>(), first);
    first = false;
  }
  void finish(int64_t e) {
    if (wanted() && !direct) out.select(0, e).copy_(scratch);
  }
};

// Start, finish or skip (zero) expert e's slice in each of a layer's gradient slots.
void begin_all(int64_t e, std::initializer_list<GradSlot*> slots) {
  for (GradSlot* g : slots) g->begin(e);
}
void finish_all(int64_t e, std::initializer_list<GradSlot*> slots) {
  for (GradSlot* g : slots) g->finish(e);
}
void skip_all(int64_t e, std::initializer_list<GradSlot*> slots) {
  for (GradSlot* g : slots) g->skip(e);
}

}  // namespace

// ----------------------------------------------------------------------------- linear

at::Tensor experts_linear_fwd(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  c10::NoGradGuard no_grad;
  check_weight(weight, "weight");
  const int64_t E = weight.size(0), Hout = weight.size(1), Hin = weight.size(2);
  TORCH_CHECK(x.defined() && x.dim() == 2, "mmkernels experts: x must be 2-D [T, Hin]");
  const int64_t T = x.size(0);
  check_2d(x, "x", T, Hin);
  check_input_dtype(x.scalar_type());
  const at::Tensor b = check_bias(bias, "bias", E, Hout);
  const Route rt = make_route(perm, offsets, T, E);
  at::Tensor y = at::empty({T, Hout}, x.options());
  if (T == 0) return y;
  const auto ct = compute_type(x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_linear_fwd", [&] {
    using CT = at::opmath_type<scalar_t>;
    const int64_t R = std::min(chunk_rows(std::max(Hin, Hout)), T);
    at::Tensor xb = at::empty({R, Hin}, x.options().dtype(ct));
    at::Tensor yb = at::empty({R, Hout}, x.options().dtype(ct));
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = rt.offsets[e], s1 = rt.offsets[e + 1];
      if (s0 == s1) continue;
      const at::Tensor Wt = expert_weight(weight, e, ct).t();  // [Hin, Hout]
      const at::Tensor be = expert_bias(b, e, ct);
      for (int64_t c0 = s0; c0 < s1; c0 += R) {
        const int64_t n = std::min(R, s1 - c0);
        at::Tensor xc = xb.narrow(0, 0, n), yc = yb.narrow(0, 0, n);
        gather_rows<scalar_t, CT>(x, rt.p + c0, n, xc.data_ptr<CT>());
        if (be.defined()) {
          at::addmm_out(yc, be, xc, Wt);
        } else {
          at::mm_out(yc, xc, Wt);
        }
        scatter_rows<CT, scalar_t>(yc.data_ptr<CT>(), rt.p + c0, n, Hout, yp);
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_linear_bwd(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& perm,
                   const at::Tensor& offsets, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, bool needs_dx, const std::vector<bool>& dw_experts) {
  c10::NoGradGuard no_grad;
  check_weight(weight, "weight");
  const int64_t E = weight.size(0), Hout = weight.size(1), Hin = weight.size(2);
  TORCH_CHECK(x.defined() && x.dim() == 2, "mmkernels experts: x must be 2-D [T, Hin]");
  const int64_t T = x.size(0);
  check_2d(x, "x", T, Hin);
  check_input_dtype(x.scalar_type());
  check_2d(dy_in, "dy", T, Hout);
  const at::Tensor dy = dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type());
  const at::Tensor b = check_bias(bias, "bias", E, Hout);
  const bool needs_dw = check_mask(dw_experts, E, "dw_experts");
  const Route rt = make_route(perm, offsets, T, E);
  const auto empty0 = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };

  at::Tensor dx = needs_dx ? at::empty({T, Hin}, x.options()) : empty0(x);
  at::Tensor dw = needs_dw ? at::empty({E, Hout, Hin}, weight.options()) : empty0(weight);
  at::Tensor db = needs_dw && b.defined() ? at::empty({E, Hout}, weight.options()) : empty0(weight);
  if (!needs_dx && !needs_dw) return {dx, dw, db};
  const auto ct = compute_type(x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_linear_bwd", [&] {
    using CT = at::opmath_type<scalar_t>;
    const int64_t R = std::max<int64_t>(1, std::min(chunk_rows(std::max(Hin, Hout)), T));
    at::Tensor dyb = at::empty({R, Hout}, x.options().dtype(ct));
    at::Tensor xb = needs_dw ? at::empty({R, Hin}, x.options().dtype(ct)) : at::Tensor();
    at::Tensor dxb = needs_dx ? at::empty({R, Hin}, x.options().dtype(ct)) : at::Tensor();
    GradSlot gw(needs_dw ? dw : at::Tensor(), ct), gb(needs_dw && b.defined() ? db : at::Tensor(), ct);
    scalar_t* dxp = needs_dx ? dx.data_ptr<scalar_t>() : nullptr;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = rt.offsets[e], s1 = rt.offsets[e + 1];
      const bool we = needs_dw && dw_experts[e] && s0 < s1;  // this expert's dW and db
      if (!we) skip_all(e, {&gw, &gb});
      if (s0 == s1 || !(needs_dx || we)) continue;
      const at::Tensor W = needs_dx ? expert_weight(weight, e, ct) : at::Tensor();  // [Hout, Hin]
      if (we) begin_all(e, {&gw, &gb});
      for (int64_t c0 = s0; c0 < s1; c0 += R) {
        const int64_t n = std::min(R, s1 - c0);
        at::Tensor dyc = dyb.narrow(0, 0, n);
        gather_rows<scalar_t, CT>(dy, rt.p + c0, n, dyc.data_ptr<CT>());
        if (needs_dx) {
          at::Tensor dxc = dxb.narrow(0, 0, n);
          at::mm_out(dxc, dyc, W);
          scatter_rows<CT, scalar_t>(dxc.data_ptr<CT>(), rt.p + c0, n, Hin, dxp);
        }
        if (we) {
          at::Tensor xc = xb.narrow(0, 0, n);
          gather_rows<scalar_t, CT>(x, rt.p + c0, n, xc.data_ptr<CT>());
          gw.add_mm(dyc.t(), xc);
          if (gb.wanted()) gb.add_colsum<CT>(dyc);
        }
      }
      if (we) finish_all(e, {&gw, &gb});
    }
  });
  return {dx, dw, db};
}

// ----------------------------------------------------------------------------- FFN

namespace {

struct FfnDims {
  int64_t T, E, Hin, Fi, F, Hout;
  Act act;
};

FfnDims check_ffn(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                  const std::string& activation) {
  check_weight(w_in, "w_in");
  check_weight(w_out, "w_out");
  FfnDims d;
  d.act = parse_activation(activation);
  d.E = w_in.size(0);
  d.Fi = w_in.size(1);
  d.Hin = w_in.size(2);
  d.Hout = w_out.size(1);
  if (d.act == Act::Swiglu) {
    TORCH_CHECK(d.Fi % 2 == 0, "mmkernels experts: swiglu needs an even w_in width (2F), got ", d.Fi);
    d.F = d.Fi / 2;
  } else {
    d.F = d.Fi;
  }
  TORCH_CHECK(w_out.size(0) == d.E && w_out.size(2) == d.F, "mmkernels experts: w_out must have shape [",
              d.E, ", Hout, ", d.F, "], got ", w_out.sizes());
  TORCH_CHECK(x.defined() && x.dim() == 2, "mmkernels experts: x must be 2-D [T, Hin]");
  d.T = x.size(0);
  check_2d(x, "x", d.T, d.Hin);
  check_input_dtype(x.scalar_type());
  return d;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_ffn_fwd(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
                const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                const c10::optional<at::Tensor>& b_out, const std::string& activation) {
  c10::NoGradGuard no_grad;
  const FfnDims d = check_ffn(x, w_in, w_out, activation);
  const int64_t T = d.T, E = d.E, Hin = d.Hin, Fi = d.Fi, F = d.F, Hout = d.Hout;
  const at::Tensor bi = check_bias(b_in, "b_in", E, Fi), bo = check_bias(b_out, "b_out", E, Hout);
  const Route rt = make_route(perm, offsets, T, E);
  at::Tensor y = at::empty({T, Hout}, x.options());
  at::Tensor h = at::empty({T, Fi}, x.options());
  at::Tensor a = at::empty({T, F}, x.options());
  if (T == 0) return {y, h, a};
  const auto ct = compute_type(x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_ffn_fwd", [&] {
    using CT = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, CT>;  // h and a are written in place
    const int64_t R = std::min(chunk_rows(std::max({Hin, Fi, Hout})), T);
    const auto copts = x.options().dtype(ct);
    at::Tensor xb = at::empty({R, Hin}, copts), yb = at::empty({R, Hout}, copts);
    at::Tensor hb = same ? at::Tensor() : at::empty({R, Fi}, copts);
    at::Tensor ab = same ? at::Tensor() : at::empty({R, F}, copts);
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = rt.offsets[e], s1 = rt.offsets[e + 1];
      if (s0 == s1) continue;
      const at::Tensor Win_t = expert_weight(w_in, e, ct).t();    // [Hin, Fi]
      const at::Tensor Wout_t = expert_weight(w_out, e, ct).t();  // [F, Hout]
      const at::Tensor bie = expert_bias(bi, e, ct), boe = expert_bias(bo, e, ct);
      const CT* bip = bie.defined() ? bie.data_ptr<CT>() : nullptr;
      for (int64_t c0 = s0; c0 < s1; c0 += R) {
        const int64_t n = std::min(R, s1 - c0);
        at::Tensor xc = xb.narrow(0, 0, n), yc = yb.narrow(0, 0, n);
        at::Tensor hc = same ? h.narrow(0, c0, n) : hb.narrow(0, 0, n);
        at::Tensor ac = same ? a.narrow(0, c0, n) : ab.narrow(0, 0, n);
        gather_rows<scalar_t, CT>(x, rt.p + c0, n, xc.data_ptr<CT>());
        at::mm_out(hc, xc, Win_t);
        bias_act_fwd<scalar_t, CT>(hc.data_ptr<CT>(), n, Fi, F, bip, d.act, same ? nullptr : hp + c0 * Fi,
                                   ac.data_ptr<CT>(), same ? nullptr : ap + c0 * F);
        if (boe.defined()) {
          at::addmm_out(yc, boe, ac, Wout_t);
        } else {
          at::mm_out(yc, ac, Wout_t);
        }
        scatter_rows<CT, scalar_t>(yc.data_ptr<CT>(), rt.p + c0, n, Hout, yp);
      }
    }
  });
  return {y, h, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
experts_ffn_bwd(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& perm,
                const at::Tensor& offsets, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                const at::Tensor& w_out, const c10::optional<at::Tensor>& b_out, const at::Tensor& h_in,
                const at::Tensor& a_in, const std::string& activation, bool needs_dx,
                const std::vector<bool>& dw_in_experts, const std::vector<bool>& dw_out_experts) {
  c10::NoGradGuard no_grad;
  const FfnDims d = check_ffn(x, w_in, w_out, activation);
  const int64_t T = d.T, E = d.E, Hin = d.Hin, Fi = d.Fi, F = d.F, Hout = d.Hout;
  const at::Tensor bi = check_bias(b_in, "b_in", E, Fi), bo = check_bias(b_out, "b_out", E, Hout);
  check_2d(dy_in, "dy", T, Hout);
  check_2d(h_in, "h", T, Fi);
  check_2d(a_in, "a", T, F);
  const bool needs_dw_in = check_mask(dw_in_experts, E, "dw_in_experts");
  const bool needs_dw_out = check_mask(dw_out_experts, E, "dw_out_experts");
  const Route rt = make_route(perm, offsets, T, E);
  const auto st = x.scalar_type();
  const at::Tensor dy = dy_in.scalar_type() == st ? dy_in : dy_in.to(st);
  const at::Tensor h = h_in.to(st).contiguous(), a = a_in.to(st).contiguous();
  const auto empty0 = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };

  at::Tensor dx = needs_dx ? at::empty({T, Hin}, x.options()) : empty0(x);
  at::Tensor dw_in = needs_dw_in ? at::empty({E, Fi, Hin}, w_in.options()) : empty0(w_in);
  at::Tensor dw_out = needs_dw_out ? at::empty({E, Hout, F}, w_out.options()) : empty0(w_out);
  at::Tensor db_in = needs_dw_in && bi.defined() ? at::empty({E, Fi}, w_in.options()) : empty0(w_in);
  at::Tensor db_out = needs_dw_out && bo.defined() ? at::empty({E, Hout}, w_out.options()) : empty0(w_out);
  if (!needs_dx && !needs_dw_in && !needs_dw_out) return {dx, dw_in, db_in, dw_out, db_out};
  const auto ct = compute_type(st);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "experts_ffn_bwd", [&] {
    using CT = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, CT>;  // a's rows are used in place
    const int64_t R = std::max<int64_t>(1, std::min(chunk_rows(std::max({Hin, Fi, Hout})), T));
    const auto copts = x.options().dtype(ct);
    at::Tensor dyb = at::empty({R, Hout}, copts), xb = at::empty({R, Hin}, copts);
    at::Tensor dab = at::empty({R, F}, copts), dhb = at::empty({R, Fi}, copts);
    at::Tensor dxb = at::empty({R, Hin}, copts);
    at::Tensor ab = same ? at::Tensor() : at::empty({R, F}, copts);
    GradSlot gwi(needs_dw_in ? dw_in : at::Tensor(), ct), gwo(needs_dw_out ? dw_out : at::Tensor(), ct);
    GradSlot gbi(needs_dw_in && bi.defined() ? db_in : at::Tensor(), ct);
    GradSlot gbo(needs_dw_out && bo.defined() ? db_out : at::Tensor(), ct);
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* dxp = needs_dx ? dx.data_ptr<scalar_t>() : nullptr;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = rt.offsets[e], s1 = rt.offsets[e + 1];
      const bool win = needs_dw_in && dw_in_experts[e] && s0 < s1;    // this expert's dW_in, db_in
      const bool wout = needs_dw_out && dw_out_experts[e] && s0 < s1;  // this expert's dW_out, db_out
      const bool wdh = needs_dx || win;                                // dH is needed
      if (!win) skip_all(e, {&gwi, &gbi});
      if (!wout) skip_all(e, {&gwo, &gbo});
      if (s0 == s1 || !(wdh || wout)) continue;
      const at::Tensor Win = needs_dx ? expert_weight(w_in, e, ct) : at::Tensor();  // [Fi, Hin]
      const at::Tensor Wout = wdh ? expert_weight(w_out, e, ct) : at::Tensor();     // [Hout, F]
      if (win) begin_all(e, {&gwi, &gbi});
      if (wout) begin_all(e, {&gwo, &gbo});
      for (int64_t c0 = s0; c0 < s1; c0 += R) {
        const int64_t n = std::min(R, s1 - c0);
        at::Tensor dyc = dyb.narrow(0, 0, n);
        gather_rows<scalar_t, CT>(dy, rt.p + c0, n, dyc.data_ptr<CT>());
        // Second layer: dW_out += dY^T A, db_out += sum dY.
        if (wout) {
          const at::Tensor ac = same ? a.narrow(0, c0, n) : ab.narrow(0, 0, n).copy_(a.narrow(0, c0, n));
          gwo.add_mm(dyc.t(), ac);
          if (gbo.wanted()) gbo.add_colsum<CT>(dyc);
        }
        if (!wdh) continue;
        // dA = dY W_out; activation: dH = dA * act'(H).
        at::Tensor dac = dab.narrow(0, 0, n), dhc = dhb.narrow(0, 0, n);
        at::mm_out(dac, dyc, Wout);
        act_bwd<scalar_t, CT>(dac.data_ptr<CT>(), hp + c0 * Fi, n, Fi, F, d.act, dhc.data_ptr<CT>());
        // First layer: dW_in += dH^T X, db_in += sum dH, dX = dH W_in.
        if (win) {
          at::Tensor xc = xb.narrow(0, 0, n);
          gather_rows<scalar_t, CT>(x, rt.p + c0, n, xc.data_ptr<CT>());
          gwi.add_mm(dhc.t(), xc);
          if (gbi.wanted()) gbi.add_colsum<CT>(dhc);
        }
        if (needs_dx) {
          at::Tensor dxc = dxb.narrow(0, 0, n);
          at::mm_out(dxc, dhc, Win);
          scatter_rows<CT, scalar_t>(dxc.data_ptr<CT>(), rt.p + c0, n, Hin, dxp);
        }
      }
      if (win) finish_all(e, {&gwi, &gbi});
      if (wout) finish_all(e, {&gwo, &gbo});
    }
  });
  return {dx, dw_in, db_in, dw_out, db_out};
}

}  // namespace mmkernels
