// mmkernels: what the contrastive CPU kernels' forward (contrastive.cpp) and backward
// (contrastive_grads.cpp) share: work sizes, input checks, row chunking and the logit. The SigLIP
// kernels (siglip.cpp) use the same chunking and checks, with their own message prefix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu_math.h"

#if !CPU_MATH_VEC
#error "the contrastive CPU kernels need GCC/Clang vector extensions (cpu_math.h's wf)"
#endif

namespace mmkernels {
namespace contrastive_detail {

using namespace cpu_math;  // ceil_div and the vector layer (wf, vexp, ...)

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
// Vectors summed in float32 before the partial sum is added in double.
constexpr int64_t FLUSH = 16;

// NaN-propagating max (scalar).
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// The offset used for a log-sum-exp: the max when it is finite, else 0 (as torch.logsumexp),
// so that all -inf gives -inf and any +inf gives +inf.
inline float lse_shift(float m) { return std::isfinite(m) ? m : 0.0f; }
inline at::Tensor lse_shift_t(const at::Tensor& m) {
  return at::where(at::isfinite(m), m, at::zeros_like(m));
}

// The logit round(scale * s). Written so that it is never fused into a following subtraction
// (FMA contraction would skip this rounding, so the backward's exp(L - lse) would no longer see
// the same L as the forward: with logits in the thousands that is a 1e-4 relative error in G).
// x + 0.0f cannot be folded without -fno-signed-zeros, and fma(a, b, 0) rounds exactly like a * b.
CPU_MATH_INLINE wf logit(float scale, const wf& s) { return s * scale + 0.0f; }

// The prefix of the input checks' messages: the op family whose kernel raised them.
constexpr const char* kContrastive = "mmkernels contrastive";

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// One O(numel) conversion to a contiguous tensor of `dtype` (a no-op when it already is one).
// (Tensor::to(dtype, ..., MemoryFormat::Contiguous) alone returns a strided 2-D view unchanged.)
inline at::Tensor to_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  return r.contiguous();
}
inline at::Tensor to_f32_contiguous(const at::Tensor& t) { return to_contiguous(t, at::kFloat); }

inline void check_features(const at::Tensor& q, const at::Tensor& k,
                           const char* who = kContrastive) {
  TORCH_CHECK(q.defined() && k.defined(), who, ": q and k must be defined");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(),
              who, " (cpu kernel): q and k must be CPU tensors, got ", q.device(),
              " and ", k.device());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2,
              who, ": q and k must be 2-D [N, D] and [M, D], got shapes ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), who, ": feature dims differ: q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(),
              who, ": q and k must have the same dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  TORCH_CHECK(is_supported_dtype(q.scalar_type()),
              who, ": unsupported dtype ", q.scalar_type(),
              " (float32, bfloat16, float16; float64 for gradcheck)");
}

// A one-element floating tensor argument (scale, bias) as float32.
inline float read_scale(const at::Tensor& scale, const char* name = "scale",
                        const char* who = kContrastive) {
  TORCH_CHECK(scale.defined() && scale.device().is_cpu(),
              who, " (cpu kernel): ", name, " must be a CPU tensor");
  TORCH_CHECK(scale.numel() == 1, who, ": ", name, " must have one element, got shape ",
              scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()),
              who, ": ", name, " must be a floating tensor, got ", scale.scalar_type());
  return scale.to(at::kFloat).item<float>();
}
inline double read_scale_f64(const at::Tensor& scale, const char* name = "scale",
                             const char* who = kContrastive) {
  read_scale(scale, name, who);  // the checks
  return scale.to(at::kDouble).item<double>();
}

// targets [n] of an integer dtype, returned contiguous int64. Each entry must lie in [0, m), or
// in [-1, m) when allow_none (-1: the row has no target).
inline at::Tensor read_targets(const at::Tensor& targets, int64_t n, int64_t m,
                               bool allow_none = false, const char* who = kContrastive) {
  TORCH_CHECK(targets.defined() && targets.device().is_cpu(),
              who, " (cpu kernel): targets must be a CPU tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n,
              who, ": targets must have shape [", n, "], got ", targets.sizes());
  TORCH_CHECK(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
              who, ": targets must be an integer tensor, got ", targets.scalar_type());
  at::Tensor t = to_contiguous(targets, at::kLong);
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t lowest = allow_none ? -1 : 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tp[i] >= lowest && tp[i] < m, who, ": targets[", i, "] = ", tp[i],
                " is out of range [", lowest, ", ", m, ")");
  }
  return t;
}

// A vector argument of the backward: shape [n], any float dtype / strides, returned contiguous
// in `dtype` (float32, or float64 on the float64 path).
inline at::Tensor read_vector(const at::Tensor& v, int64_t n, const char* name,
                              at::ScalarType dtype = at::kFloat, const char* who = kContrastive) {
  TORCH_CHECK(v.defined() && v.device().is_cpu(), who, " (cpu kernel): ", name,
              " must be a CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, who, ": ", name,
              " must have shape [", n, "], got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), who, ": ", name,
              " must be floating, got ", v.scalar_type());
  return to_contiguous(v, dtype);
}

inline int64_t chunk_rows(int64_t n, int64_t m) {
  if (m <= 0) return std::max<int64_t>(1, n);
  return std::max<int64_t>(1, std::min<int64_t>(n, BUDGET / m));
}

// How a chunk of rc rows x m columns is cut into row-segment work items.
struct RowSplit {
  int64_t segments;  // per row
  int64_t width;     // columns per segment (last one may be shorter)
  int64_t grain;     // work items per parallel_for grain
};

inline RowSplit split_rows(int64_t rc, int64_t m) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t segs = 1;
  if (rc < 4 * threads) {
    segs = std::max<int64_t>(1, std::min(ceil_div(m, MIN_SEGMENT), ceil_div(4 * threads, rc)));
  }
  const int64_t width = std::max<int64_t>(1, ceil_div(m, segs));
  segs = std::max<int64_t>(1, ceil_div(m, width));
  return {segs, width, std::max<int64_t>(1, GRAIN_ELEMS / width)};
}

}  // namespace contrastive_detail
}  // namespace mmkernels
