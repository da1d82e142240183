// mmkernels: CPU (C++) grouped GEMM of the modality experts (gather/scatter through the routing).
// The op contract: mmkernels/experts/grouped_mm/ops.py.
#pragma once

#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mmkernels {

// Routing: perm [T] int32 (slot s holds token perm[s]), offsets [E+1] int32 (expert e owns slots
// offsets[e] .. offsets[e+1]-1). x [T, Hin], dy [T, Hout]: float32 / bfloat16 / float16 (computed
// in float32) or float64 (computed in float64); any strides. Weights [E, ., .] and biases [E, .]
// any floating dtype and strides. Outputs and dx in x's dtype; weight and bias gradients in the
// weight's dtype (db in weight's, db_in in w_in's, db_out in w_out's). Experts with no tokens get zero gradients; T = 0 gives empty outputs.

// y [T, Hout] (token order) = x @ weight[e]^T + bias[e] for each token's expert e.
at::Tensor experts_linear_fwd(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// Weight-gradient masks (dw_experts, dw_in_experts, dw_out_experts): E flags, true for the
// experts whose weight (and bias) gradient is wanted. When none is, the gradient is empty(0);
// otherwise it is [E, ...] with zero slices for the experts not wanted, whose GEMMs are skipped
// (a frozen expert costs no weight-gradient work).

// (dx [T, Hin] or empty(0) unless needs_dx, dw [E, Hout, Hin] or empty(0),
//  db [E, Hout] or empty(0) when bias is None or no dw is wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_linear_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& perm,
                   const at::Tensor& offsets, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, bool needs_dx,
                   const std::vector<bool>& dw_experts);

// activation: "gelu" (erf), "gelu_tanh", "silu", "relu", "swiglu" (w_in rows 0..F-1 gate,
// F..2F-1 up; act = silu(gate) * up). w_in [E, Fi, Hin] (Fi = 2F for swiglu, else F),
// w_out [E, Hout, F].
// Returns (y [T, Hout] token order, h [T, Fi] pre-activation in SORTED order,
//          a [T, F] activation in SORTED order), all in x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
experts_ffn_fwd(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
                const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                const c10::optional<at::Tensor>& b_out, const std::string& activation);

// Returns (dx [T, Hin] or empty(0) unless needs_dx, dw_in [E, Fi, Hin], db_in [E, Fi],
//          dw_out [E, Hout, F], db_out [E, Hout]), each weight (bias) gradient empty(0) when its
// mask wants no expert (or the bias is None); h and a are the forward's sorted-order outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
experts_ffn_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& perm,
                const at::Tensor& offsets, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                const at::Tensor& w_out, const c10::optional<at::Tensor>& b_out, const at::Tensor& h,
                const at::Tensor& a, const std::string& activation, bool needs_dx,
                const std::vector<bool>& dw_in_experts, const std::vector<bool>& dw_out_experts);

}  // namespace mmkernels
