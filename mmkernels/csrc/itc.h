// mmkernels: CPU (C++) kernels of the ALBEF / BLIP / BLIP-2 contrastive objectives (the itc unit).
// The exact contract is in mmkernels/contrastive/itc/ops.py.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mmkernels {

// q [N, Q, D], k [M0, P, D]: float32, bfloat16 or float16 (computed in float32), or float64
// (computed in float64, for gradcheck); any strides. kq [K, P, D] (optional, k's dtype) a queue
// that continues the keys without a copy: the keys are [k; kq], M = M0 + K columns (used as
// stored: strided views such as queue.T of a [D, K] buffer go to BLAS as they are).
// S_ij = max_{a, b} q[i, a] . key[j, b] (the first maximal (a, b) in a * P + b order),
// L = scale * S. tq [N, Q', D'], tk [M, P', D'] the teacher pair (tk absent: the keys, and it must
// be absent with a queue; both ignored when alpha == 0), TL = tscale * TS. row_ids [N], col_ids [M]
// integer ids: pos_ij = row_ids[i] == col_ids[j]. scale, tscale: one-element float tensors.
// bf16_gemm: for bfloat16 features, multiply them with bf16 GEMMs (the products rounded to bf16,
// as eager bf16 code does) instead of float32 copies (mmkernels._backend.cpu_bf16_gemm).
// Extra memory: O((N + M) * D) for conversions and copies of q, plus a tile buffer of about 1 MiB
// per thread, whatever N and M.

// (loss, lse, tlse, count) [N] each, float32 (float64 for float64 input): the per-row
// cross-entropy of L against the soft targets of ops.py, log-sum-exp of L and of TL (0 when
// alpha == 0), and the number of positives.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
itc_rows(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kq,
         const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
         const at::Tensor& scale, const at::Tensor& tscale, const at::Tensor& row_ids,
         const at::Tensor& col_ids, double alpha, double eps, bool bf16_gemm = false);

// (dq [N, Q, D] in q's dtype, dk [M0, P, D] in k's dtype (the queue gets no gradient) or an empty
// [0] tensor when need_dk is false, dscale 0-dim float32 / float64) of sum_i g[i] * loss[i], from
// the forward's lse, tlse and count, recomputing the similarities tile by tile.
std::tuple<at::Tensor, at::Tensor, at::Tensor>
itc_grads(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
          const std::optional<at::Tensor>& kq, const std::optional<at::Tensor>& tq,
          const std::optional<at::Tensor>& tk, const at::Tensor& scale, const at::Tensor& tscale,
          const at::Tensor& row_ids, const at::Tensor& col_ids, const at::Tensor& lse,
          const at::Tensor& tlse, const at::Tensor& count, double alpha, double eps, bool need_dk,
          bool bf16_gemm = false);

// [N] int64: argmax_j (float32(L_ij) + G_ij) over the non-positive j (the smallest j on ties), -1
// for a row without one (or whose best key is infinite), G the Gumbel noise of
// mmkernels/contrastive/itc/random.py for the 0-dim int64 seed.
at::Tensor itc_negatives(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                         const at::Tensor& row_ids, const at::Tensor& col_ids,
                         const at::Tensor& seed, bool bf16_gemm = false);

}  // namespace mmkernels
