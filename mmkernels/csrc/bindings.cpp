// mmkernels._C: Python bindings of the C++ CPU kernels.
#include <torch/extension.h>

#include "attention.h"
#include "contrastive.h"
#include "cpu_math.h"
#include "cross_attention.h"
#include "experts.h"
#include "experts_layer_norm.h"
#include "itc.h"
#include "siglip.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels C++ CPU kernels";

  m.def("contrastive_stats", &mmkernels::contrastive_stats,
        "Row (and column) statistics of L = scale * q @ k^T without materialising L.\n"
        "Returns (row_logsum, row_max, row_ssum, pos, col_logsum, col_max, col_ssum), float32:\n"
        "logsum = log sum exp(L - max), ssum = sum (L - max) (max taken as 0 where not finite);\n"
        "col_* are empty [0] when with_columns is False.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("targets"),
        py::arg("with_columns"), py::call_guard<py::gil_scoped_release>());

  m.def("contrastive_grads", &mmkernels::contrastive_grads,
        "Gradients (dq, dk, dscale) of the contrastive statistics, recomputing L chunk by chunk.\n"
        "col_max, col_logsum, g_col_lse, g_col_sum are empty [0] tensors when there are no\n"
        "column terms.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("targets"), py::arg("row_max"),
        py::arg("row_logsum"), py::arg("col_max"), py::arg("col_logsum"), py::arg("g_row_lse"), py::arg("g_row_sum"), py::arg("g_pos"),
        py::arg("g_col_lse"), py::arg("g_col_sum"), py::call_guard<py::gil_scoped_release>());

  m.def("siglip_rows", &mmkernels::siglip_rows,
        "SigLIP per-row sigmoid loss sum_j softplus(-z_ij * L_ij), L = scale * q @ k^T + bias, without\n"
        "materialising L; z_ij = +1 at j == targets[i] (-1: no positive), else -1. Returns [N] float32.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("targets"),
        py::arg("bf16_gemm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("siglip_grads", &mmkernels::siglip_grads,
        "Gradients (dq, dk, dscale, dbias) of sum_i g_row[i] * row_loss[i] of siglip_rows, recomputing\n"
        "L chunk by chunk.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("targets"),
        py::arg("g_row"), py::arg("bf16_gemm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("siglip_fwd_bwd", &mmkernels::siglip_fwd_bwd,
        "siglip_rows and siglip_grads for g_row = 1 from one pass over the logits (a scalar loss's\n"
        "forward and backward). Returns (row_loss, dq, dk, dscale, dbias).",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("targets"),
        py::arg("bf16_gemm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("itc_rows", &mmkernels::itc_rows,
        "ITC per-row cross-entropy of L = scale * max-over-token-pairs similarity against soft targets\n"
        "(teacher softmax weight alpha, positives by ids, label smoothing eps), without materialising L.\n"
        "kq: a queue continuing the keys [k; kq] (or None); tq None when alpha == 0; tk None: the keys.\n"
        "Returns (loss, lse, tlse, count) [N], float32/float64.",
        py::arg("q"), py::arg("k"), py::arg("kq"), py::arg("tq"), py::arg("tk"), py::arg("scale"), py::arg("tscale"),
        py::arg("row_ids"), py::arg("col_ids"), py::arg("alpha"), py::arg("eps"),
        py::arg("bf16_gemm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("itc_grads", &mmkernels::itc_grads,
        "Gradients (dq, dk, dscale) of sum_i g[i] * loss[i] of itc_rows, recomputing L tile by tile;\n"
        "dk covers k only (the queue kq gets none), an empty [0] tensor when need_dk is False.",
        py::arg("g"), py::arg("q"), py::arg("k"), py::arg("kq"), py::arg("tq"), py::arg("tk"), py::arg("scale"),
        py::arg("tscale"), py::arg("row_ids"), py::arg("col_ids"), py::arg("lse"), py::arg("tlse"),
        py::arg("count"), py::arg("alpha"), py::arg("eps"), py::arg("need_dk"),
        py::arg("bf16_gemm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("itc_negatives", &mmkernels::itc_negatives,
        "ITM hard negatives: per row the first argmax_j of float32(L_ij) + Gumbel(seed, i, j) over the\n"
        "non-positive j (-1 if none). Returns [N] int64.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("row_ids"), py::arg("col_ids"),
        py::arg("seed"), py::arg("bf16_gemm") = false, py::call_guard<py::gil_scoped_release>());

  m.def("attention_fwd", &mmkernels::attention_fwd,
        "Blockwise multimodal masked attention forward. meta: [] (no mask) or [q_mod, k_mod, q_seg,\n"
        "k_seg, q_pos, k_pos, q_run, k_run, rules]. Returns (out in q.dtype, lse, row_max, row_sum),\n"
        "the last three [B, Hq, Sq] float32/float64: lse = row_max + log(row_sum).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("meta"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());

  m.def("attention_bwd", &mmkernels::attention_bwd,
        "Blockwise multimodal masked attention backward, recomputing P = exp(S - row_max) / row_sum.\n"
        "Returns (dq, dk, dv).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("row_max"), py::arg("row_sum"),
        py::arg("dout"), py::arg("meta"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());

  m.def("cross_attention_fwd", &mmkernels::cross_attention_fwd,
        "Cross-attention forward with key padding (bool [B, Lk], True = attend) and counter-hash\n"
        "attention dropout (seed int64 [2]). Returns (out [B, H, Lq, D] in q.dtype, lse, row_max,\n"
        "row_sum), the last three [B, H, Lq] float32/float64: lse = row_max + log(row_sum).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("seed"),
        py::arg("scale"), py::arg("dropout_p"), py::call_guard<py::gil_scoped_release>());

  m.def("cross_attention_bwd", &mmkernels::cross_attention_bwd,
        "Cross-attention backward, recomputing P = exp(S - row_max) / row_sum (and the dropout mask\n"
        "from the seed). Returns (dq, dk, dv), contiguous in the inputs' dtype.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("row_max"),
        py::arg("row_sum"), py::arg("dout"),
        py::arg("key_padding_mask"), py::arg("seed"), py::arg("scale"), py::arg("dropout_p"),
        py::call_guard<py::gil_scoped_release>());

  m.def("experts_linear_fwd", &mmkernels::experts_linear_fwd,
        "Modality-expert linear: y[perm[s]] = x[perm[s]] @ weight[e]^T + bias[e] for the slots s of\n"
        "expert e (offsets[e] <= s < offsets[e+1]). Returns y [T, Hout] in token order.",
        py::arg("x"), py::arg("perm"), py::arg("offsets"), py::arg("weight"), py::arg("bias"),
        py::call_guard<py::gil_scoped_release>());

  m.def("experts_linear_bwd", &mmkernels::experts_linear_bwd,
        "Backward of experts_linear_fwd. Returns (dx or empty(0), dw or empty(0), db or empty(0));\n"
        "dw_experts: E flags, the experts whose weight gradient is wanted (others: zero slices).",
        py::arg("dy"), py::arg("x"), py::arg("perm"), py::arg("offsets"), py::arg("weight"),
        py::arg("bias"), py::arg("needs_dx"), py::arg("dw_experts"),
        py::call_guard<py::gil_scoped_release>());

  m.def("experts_ffn_fwd", &mmkernels::experts_ffn_fwd,
        "Modality-expert FFN act(x @ w_in[e]^T + b_in[e]) @ w_out[e]^T + b_out[e]. Returns (y [T, Hout]\n"
        "token order, h [T, Fi] pre-activation sorted order, a [T, F] activation sorted order).",
        py::arg("x"), py::arg("perm"), py::arg("offsets"), py::arg("w_in"), py::arg("b_in"),
        py::arg("w_out"), py::arg("b_out"), py::arg("activation"),
        py::call_guard<py::gil_scoped_release>());

  m.def("experts_ffn_bwd", &mmkernels::experts_ffn_bwd,
        "Backward of experts_ffn_fwd from its saved h and a. Returns (dx, dw_in, db_in, dw_out, db_out),\n"
        "each empty(0) when not wanted (needs_dx; the per-expert masks dw_in_experts, dw_out_experts).",
        py::arg("dy"), py::arg("x"), py::arg("perm"), py::arg("offsets"), py::arg("w_in"),
        py::arg("b_in"), py::arg("w_out"), py::arg("b_out"), py::arg("h"), py::arg("a"),
        py::arg("activation"), py::arg("needs_dx"), py::arg("dw_in_experts"), py::arg("dw_out_experts"),
        py::call_guard<py::gil_scoped_release>());

  m.def("experts_layer_norm_fwd", &mmkernels::experts_layer_norm_fwd,
        "Modality-expert (multiway) LayerNorm: y[t] = layer_norm(x[t]) * weight[e] + bias[e] for the\n"
        "tokens t of expert e. Returns (y [T, H] token order, mean [T], rstd [T] float32/float64).",
        py::arg("x"), py::arg("perm"), py::arg("offsets"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::call_guard<py::gil_scoped_release>());

  m.def("experts_layer_norm_bwd", &mmkernels::experts_layer_norm_bwd,
        "Backward of experts_layer_norm_fwd from its saved mean and rstd. Returns (dx, dw, db), each\n"
        "empty(0) when not wanted (needs_dx; dw_experts: E flags, others get zero slices; no bias).",
        py::arg("dy"), py::arg("x"), py::arg("perm"), py::arg("offsets"), py::arg("weight"),
        py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("needs_dx"), py::arg("dw_experts"),
        py::call_guard<py::gil_scoped_release>());

  m.def("set_cpu_blas", &mmkernels::cpu_math::set_blas_enabled,
        "Let the CPU kernels' GEMMs call BLAS (True, the default) or force their ATen fallback\n"
        "(False: the path of a torch that exports no sgemm_/dgemm_). Returns the previous setting.",
        py::arg("enabled"));
}
