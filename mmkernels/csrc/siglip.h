// mmkernels: CPU (C++) kernels of the SigLIP sigmoid loss. See mmkernels/contrastive/siglip/ops.py.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace mmkernels {

// q [N, D], k [M, D]: float32, bfloat16 or float16 (computed in float32), or float64 (computed in
// float64, for gradcheck); any strides. scale, bias: one-element float tensors. targets: integer
// [N] in [-1, M) (-1: the row has no positive). L = scale * q @ k^T + bias is never materialised.

// bf16_gemm: for bfloat16 q and k, multiply them with bf16 GEMMs (fp32 accumulation, the product
// rounded to bf16, as eager bf16 code does) instead of float32 copies; worth it where the CPU has
// bf16 dot products (the caller knows: mmkernels._backend.cpu_bf16_gemm).

// Per-row loss sum_j softplus(-z_ij * L_ij) (z_ij = +1 at j == targets[i], else -1): [N] float32
// (float64 for float64 input).
at::Tensor siglip_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                       const at::Tensor& bias, const at::Tensor& targets, bool bf16_gemm = false);

// Gradients (dq, dk, dscale, dbias) of sum_i g_row[i] * row_loss[i]: dq, dk in the input dtype,
// dscale and dbias 0-dim float32 (float64 for float64 input).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
             const at::Tensor& bias, const at::Tensor& targets, const at::Tensor& g_row,
             bool bf16_gemm = false);

// The forward and backward of the scalar loss sum_i row_loss[i] in one pass over the logits:
// (row_loss [N], and dq, dk, dscale, dbias for g_row = 1), as the two functions above return them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
siglip_fwd_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
               const at::Tensor& bias, const at::Tensor& targets, bool bf16_gemm = false);

}  // namespace mmkernels
