// mmkernels: CPU (C++) multimodal masked attention. See mmkernels/attention/ops.py.
#pragma once

#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace mmkernels {

// q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (Hq % Hkv == 0; query head h uses kv head h / (Hq / Hkv)),
// float32 / bfloat16 / float16 (computed in float32) or float64 (computed in float64); any strides.
// meta: [q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules] (int32 [B, S] each, rules
// int8/int32 [NM, NM]) or an empty list (no mask: full attention).

// Returns (out [B, Hq, Sq, D] in q.dtype, lse, row_max, row_sum), the last three [B, Hq, Sq] float32
// (float64 for float64 input): row_max is the max of the row's scaled scores, row_sum
// = sum_j exp(score_j - row_max), lse = row_max + log(row_sum). Rows that see no key: out = 0,
// lse = row_max = -inf, row_sum = 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::vector<at::Tensor>& meta, double scale);

// Backward from the forward's out, row_max and row_sum (P = exp(score - row_max) / row_sum).
// Returns (dq, dk, dv) in the input dtype; rows that see no key contribute nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& row_max, const at::Tensor& row_sum, const at::Tensor& dout,
              const std::vector<at::Tensor>& meta, double scale);

}  // namespace mmkernels
