// pybind11 module megatron_lime._kernels_cpu: the CPU fused kernels, called by the torch
// custom ops in megatron_lime/kernels/ (which add autograd, fake tensors and dispatch).
#include <torch/extension.h>

#include "rms_norm.h"
#include "silu.h"
#include "vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused RMSNorm and SiLU for CPU tensors (fp32, bf16, fp16, fp64; fp32 accumulation).";
  m.attr("vectorized") = pybind11::bool_(LIME_HAVE_AVX2);
  m.def("rms_norm_fwd", &lime::cpu::rms_norm_fwd, "x (..., n), weight (n,), eps -> (y (..., n), rstd (...))",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rms_norm_fwd_out", &lime::cpu::rms_norm_fwd_out, "rms_norm_fwd into preallocated y and rstd",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"), pybind11::arg("y"), pybind11::arg("rstd"));
  m.def("rms_norm_bwd", &lime::cpu::rms_norm_bwd,
        "dy, x (..., n), weight (n,), rstd (...), weight_grad -> (dx, dw); dw is empty (0,) without weight_grad",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("rstd"),
        pybind11::arg("weight_grad") = true);
  m.def("rms_norm_bwd_out", &lime::cpu::rms_norm_bwd_out, "rms_norm_bwd into preallocated dx and dw",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("rstd"), pybind11::arg("dx"),
        pybind11::arg("dw"));
  m.def("silu_fwd", &lime::cpu::silu_fwd, "x -> x * sigmoid(x)", pybind11::arg("x"));
  m.def("silu_fwd_out", &lime::cpu::silu_fwd_out, "silu_fwd into preallocated y", pybind11::arg("x"),
        pybind11::arg("y"));
  m.def("silu_bwd", &lime::cpu::silu_bwd, "dy, x -> dy * s * (1 + x * (1 - s)), s = sigmoid(x)",
        pybind11::arg("dy"), pybind11::arg("x"));
  m.def("silu_bwd_out", &lime::cpu::silu_bwd_out, "silu_bwd into preallocated dx", pybind11::arg("dy"),
        pybind11::arg("x"), pybind11::arg("dx"));
}
