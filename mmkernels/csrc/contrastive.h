// mmkernels: CPU (C++) contrastive kernels. See mmkernels/contrastive/ops.py.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace mmkernels {

// q [N, D], k [M, D]: float32, bfloat16 or float16 (computed in float32), or float64 (computed in
// float64, for gradcheck); any strides. scale: one-element float tensor. targets: int64 [N].

// Forward statistics of L = scale * q @ k^T without materialising L.
// Returns (row_logsum, row_max, row_ssum, pos, col_logsum, col_max, col_ssum), float32 (float64
// for float64 input), with shift = max where finite, else 0: logsum = log sum exp(L - shift),
// ssum = sum (L - shift); the col_* tensors are empty [0] when with_columns is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& targets, bool with_columns);

// Gradients (dq, dk, dscale) for upstream gradients of the forward statistics: dq, dk in the
// input dtype, dscale a 0-dim float32 (float64 for float64 input).
// The softmax is exp((L - shift(max)) - logsum); g_row_lse / g_row_sum are the gradients of
// the log-sum-exp / plain sum (those of logsum / ssum with the max held fixed).
// col_max, col_logsum, g_col_lse and g_col_sum are empty [0] tensors when there are no column
// terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
contrastive_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& targets, const at::Tensor& row_max,
                  const at::Tensor& row_logsum, const at::Tensor& col_max,
                  const at::Tensor& col_logsum, const at::Tensor& g_row_lse,
                  const at::Tensor& g_row_sum, const at::Tensor& g_pos,
                  const at::Tensor& g_col_lse, const at::Tensor& g_col_sum);

}  // namespace mmkernels
