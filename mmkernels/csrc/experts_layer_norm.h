// mmkernels: CPU (C++) per-modality ("multiway") LayerNorm, routed as the experts' grouped GEMM
// (experts.h: perm [T] int32 slot -> token, offsets [E+1] int32).
// The op contract: mmkernels/experts/layer_norm/ops.py.
#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mmkernels {

// y[t] = (x[t] - mean[t]) * rstd[t] * weight[e] + bias[e]
// for each token's expert e, statistics over the H features (biased variance, as nn.LayerNorm).
// x, dy [T, H]; weight, bias [E, H]; eps as nn.LayerNorm's.
// Returns (y [T, H] token order in x's dtype, mean [T], rstd [T]); mean and rstd are float32
// (float64 for float64 x), token order, as the backward takes them.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_layer_norm_fwd(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps);

// Returns (dx [T, H] in x's dtype or empty(0) unless needs_dx, dw [E, H] in weight's dtype or
// empty(0), db [E, H] in bias's dtype or empty(0) when bias is None); dw_experts as above (E flags;
// zero slices for the experts left out, and for experts with no tokens).
std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& perm,
                       const at::Tensor& offsets, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                       const at::Tensor& rstd, bool needs_dx, const std::vector<bool>& dw_experts);

}  // namespace mmkernels
