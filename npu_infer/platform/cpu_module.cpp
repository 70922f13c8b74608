// The Python module of the CPU kernels (cpu_kernels.py builds and loads it): the kernels of cpu_kernels.h,
// cpu_int8_kernels.h and cpu_int4_kernels.h, and the decode stack of cpu_decode_stack.h. The one file that includes
// pybind11.
#include <torch/python.h>  // pybind11 with the tensor casters; lighter than torch/extension.h (all of libtorch)

#include "cpu_decode_stack.h"
#include "cpu_int4_kernels.h"
#include "cpu_int8_kernels.h"
#include "cpu_kernels.h"

namespace py = pybind11;
using namespace npu_infer_kernels;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x (in place)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary_", &rotary_, "neox rotary in place on the leading heads of a fused QKV row");
  m.def("cache_write", &cache_write, "write k/v rows into the head-major paged cache");
  m.def("decode_attention", &decode_attention, "one-token attention straight from the paged cache");
  m.def("paged_attention", &paged_attention, "causal attention for decodes and prefills from the paged cache");
  m.def("ban_by_bitmask_", &ban_by_bitmask_, "-inf at the tokens a structured-output bitmask bans (in place)");
  m.def("argmax_rows", &argmax_rows, "each row's first maximum, and whether the row holds a NaN");
  m.def("pack_linear", &pack_linear, "pack an [N, K] bf16 or fp32 weight for linear_packed");
  m.def("linear_packed", &linear_packed, "x @ W^T (+ bias) from a packed weight", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias"), py::arg("fp32_out") = false);
  m.def("pack_int8", &npu_infer_int8::pack_int8, "pack an [N, K] int8 weight in panels (group 4: w8a8, 2: w8a16)");
  m.def("quantize_per_token", &npu_infer_int8::quantize_per_token, "symmetric int8 per row: (q [M, K padded], scale [M])");
  m.def("linear_w8a8_quantized", &npu_infer_int8::linear_w8a8_quantized, "int8 x int8 -> int32 with the scales applied");
  m.def("linear_w8a8", &npu_infer_int8::linear_w8a8, "quantize x per token, then linear_w8a8_quantized");
  m.def("linear_w8a16", &npu_infer_int8::linear_w8a16, "bf16 x int8 weights (made bf16 in registers)");
  m.def("linear_w4a16", &npu_infer_int4::linear_w4a16, "bf16 x GGUF Q4 weights, d * q + m per group of 32");

  py::class_<StackLinear>(m, "StackLinear")
      .def(py::init<std::string, at::Tensor, int64_t, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    c10::optional<at::Tensor>, c10::optional<at::Tensor>>(),
           py::arg("scheme"), py::arg("packed"), py::arg("n"), py::arg("bias"), py::arg("scale") = c10::nullopt,
           py::arg("comp") = c10::nullopt, py::arg("mins") = c10::nullopt)
      .def("__call__", &StackLinear::operator(), "x @ W^T (+ bias), as the decode stack computes it");
  py::class_<LayerWeights>(m, "LayerWeights")
      .def(py::init<at::Tensor, at::Tensor, StackLinear, StackLinear, StackLinear, StackLinear>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"), py::arg("o_proj"), py::arg("gate_up"),
           py::arg("down"));
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<std::vector<LayerWeights>, int64_t, int64_t, int64_t, double, double, at::Tensor>(),
           py::arg("layers"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("cos_sin"))
      .def("forward", &DecodeStack::forward, "all layers of a pure decode step: returns (hidden, residual)",
           py::arg("hidden"), py::arg("positions"), py::arg("caches"), py::arg("slots"), py::arg("block_tables"),
           py::arg("seq_lens"));
}
