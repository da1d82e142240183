// mmkernels: what the experts CPU kernels share (csrc/experts.cpp: the grouped GEMMs;
// csrc/experts_layer_norm.cpp: the per-modality LayerNorm): the routing read from perm / offsets,
// the input checks and the compute type. The routing's contract: mmkernels/experts/routing.py.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace mmkernels {
namespace experts_common {

// Roughly how many elements one parallel work item of an elementwise (row) pass should cover.
constexpr int64_t GRAIN_ELEMS = int64_t(1) << 14;

inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, GRAIN_ELEMS / std::max<int64_t>(width, 1));
}

// float32 for float32 / bfloat16 / float16 inputs, float64 for float64.
inline at::ScalarType compute_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// The routing: slot s of the sorted order holds token perm[s]; expert e owns slots
// offsets[e] .. offsets[e+1]-1.
struct Route {
  at::Tensor perm;               // contiguous int32 [T]
  std::vector<int64_t> offsets;  // [E + 1]
  const int32_t* p = nullptr;
  // The expert owning slot s (offsets[e] <= s < offsets[e+1]).
  int64_t expert_of(int64_t s) const {
    return std::upper_bound(offsets.begin(), offsets.end(), s) - offsets.begin() - 1;
  }
};

// perm [T] and offsets [E + 1] (integer CPU tensors) checked: offsets run from 0 to T without
// decreasing, perm's entries lie in [0, T).
inline Route make_route(const at::Tensor& perm, const at::Tensor& offsets, int64_t T, int64_t E) {
  TORCH_CHECK(perm.defined() && offsets.defined(), "mmkernels experts: perm and offsets must be defined");
  TORCH_CHECK(perm.device().is_cpu() && offsets.device().is_cpu(),
              "mmkernels experts (cpu kernel): perm and offsets must be CPU tensors");
  TORCH_CHECK(!at::isFloatingType(perm.scalar_type()) && !at::isFloatingType(offsets.scalar_type()),
              "mmkernels experts: perm and offsets must be integer tensors");
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == T, "mmkernels experts: perm must have shape [", T,
              "], got ", perm.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == E + 1,
              "mmkernels experts: offsets must have shape [", E + 1, "], got ", offsets.sizes());
  Route r;
  r.perm = perm.to(at::kInt).contiguous();
  r.p = r.perm.data_ptr<int32_t>();
  const at::Tensor oc = offsets.to(at::kLong).contiguous();
  const int64_t* o = oc.data_ptr<int64_t>();
  r.offsets.assign(o, o + E + 1);
  TORCH_CHECK(r.offsets[0] == 0 && r.offsets[E] == T, "mmkernels experts: offsets must run from 0 to T = ",
              T, ", got ", offsets);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(r.offsets[e] <= r.offsets[e + 1], "mmkernels experts: offsets must be non-decreasing, got ",
                offsets);
  }
  bool in_range = true;
  for (int64_t s = 0; s < T; ++s) in_range &= (r.p[s] >= 0) & (r.p[s] < T);
  TORCH_CHECK(in_range, "mmkernels experts: perm has entries outside [0, ", T, ")");
  return r;
}

// t: a floating CPU tensor of shape [rows, cols].
inline void check_2d(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "mmkernels experts (cpu kernel): ", name,
              " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "mmkernels experts: ", name,
              " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "mmkernels experts: ", name, " must be floating, got ",
              t.scalar_type());
}

inline void check_input_dtype(at::ScalarType st) {
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "mmkernels experts: dtype must be float32, float64, bfloat16 or float16, got ", st);
}

// A weight-gradient mask: E flags (the experts whose weight gradient is wanted); true if any is.
inline bool check_mask(const std::vector<bool>& mask, int64_t E, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(mask.size()) == E, "mmkernels experts: ", name,
              " must hold one flag per expert (", E, "), got ", mask.size());
  return std::any_of(mask.begin(), mask.end(), [](bool b) { return b; });
}

}  // namespace experts_common
}  // namespace mmkernels
