// mmkernels: CPU (C++) cross-attention with key padding and counter-hash attention dropout.
// See mmkernels/cross_attention/reference.py (the definition) and mmkernels/cross_attention/ops.py.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace mmkernels {

// q [B, H, Lq, D], k/v [B, H, Lk, D] (any strides), float32 / bfloat16 / float16 (computed in
// float32) or float64 (computed in float64). key_padding_mask: bool [B, Lk], True = attend, or None.
// seed: int64 [2] (s0, s1) on the CPU, needed when dropout_p > 0 (ignored otherwise).
// Returns (out [B, H, Lq, D] contiguous in q.dtype, lse, row_max, row_sum), the last three
// [B, H, Lq] float32 (float64 for float64): row_max m = max_j s_ij, row_sum l = sum_j exp(s_ij - m)
// (before dropout), lse = m + log l (for inspection; the backward takes m and l apart).
// Rows whose keys are all padding: out = 0, lse = row_max = -inf, row_sum = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cross_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& key_padding_mask,
                    const c10::optional<at::Tensor>& seed, double scale, double dropout_p);

// row_max, row_sum: as the forward returned them. Returns (dq, dk, dv), contiguous in the inputs'
// dtype; fully padded rows contribute nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
cross_attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& row_max, const at::Tensor& row_sum,
                    const at::Tensor& dout,
                    const c10::optional<at::Tensor>& key_padding_mask,
                    const c10::optional<at::Tensor>& seed, double scale, double dropout_p);

}  // namespace mmkernels
