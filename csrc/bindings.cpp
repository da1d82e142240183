// mmkernels._C: Python bindings of the C++ CPU kernels.
#include <torch/extension.h>

#include "attention.h"
#include "contrastive.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels C++ CPU kernels";

  m.def("contrastive_stats", &mmkernels::contrastive_stats,
        "Row (and column) statistics of L = scale * q @ k^T without materialising L.\n"
        "Returns (row_lse, row_max, row_sum, pos, col_lse, col_max, col_sum), float32;\n"
        "col_* are empty [0] when with_columns is False.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("targets"),
        py::arg("with_columns"), py::call_guard<py::gil_scoped_release>());

  m.def("contrastive_grads", &mmkernels::contrastive_grads,
        "Gradients (dq, dk, dscale) of the contrastive statistics, recomputing L chunk by chunk.\n"
        "col_lse, g_col_lse, g_col_sum are empty [0] tensors when there are no column terms.",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("targets"), py::arg("row_lse"),
        py::arg("col_lse"), py::arg("g_row_lse"), py::arg("g_row_sum"), py::arg("g_pos"),
        py::arg("g_col_lse"), py::arg("g_col_sum"), py::call_guard<py::gil_scoped_release>());

  m.def("attention_fwd", &mmkernels::attention_fwd,
        "Blockwise multimodal masked attention forward. meta: [] (no mask) or [q_mod, k_mod, q_seg,\n"
        "k_seg, q_pos, k_pos, q_run, k_run, rules]. Returns (out in q.dtype, lse float32/float64).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("meta"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());

  m.def("attention_bwd", &mmkernels::attention_bwd,
        "Blockwise multimodal masked attention backward, recomputing P from lse. Returns (dq, dk, dv).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"),
        py::arg("meta"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
