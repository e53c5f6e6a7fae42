// megatron_lime._kernels_cpu: defines the lime:: operators (schemas) and registers the CPU
// kernels as their CPU implementations; _kernels_cuda registers the CUDA ones. torch.ops.lime.*
// then reaches a kernel through the dispatcher with no Python in between; megatron_lime/kernels/
// adds the fake (meta) implementations in Python; autograd.cpp the autograd. The pybind11 functions
// are the same kernels by name.
#include <torch/extension.h>
#include <torch/library.h>

#include "rms_norm.h"
#include "silu.h"
#include "vec.h"

TORCH_LIBRARY(lime, m) {
  // pt2_compliant: the fake implementations and autograd registered in Python make them safe to trace.
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", tags);
  m.def("add_rms_norm_fwd(Tensor residual, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)", tags);
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, bool weight_grad=True, "
        "Tensor? residual_grad=None) -> (Tensor, Tensor)", tags);
  m.def("silu_fwd(Tensor x) -> Tensor", tags);
  m.def("silu_bwd(Tensor dy, Tensor x) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(lime, CPU, m) {
  m.impl("rms_norm_fwd", &lime::cpu::rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &lime::cpu::add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &lime::cpu::rms_norm_bwd);
  m.impl("silu_fwd", &lime::cpu::silu_fwd);
  m.impl("silu_bwd", &lime::cpu::silu_bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused RMSNorm, residual add + RMSNorm and SiLU for CPU tensors (fp32, bf16, fp16, fp64; fp32 "
            "accumulation).";
  m.attr("vectorized") = pybind11::bool_(LIME_HAVE_AVX2);
  m.def("rms_norm_fwd", &lime::cpu::rms_norm_fwd, "x (..., n), weight (n,), eps -> (y (..., n), rstd (...))",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("add_rms_norm_fwd", &lime::cpu::add_rms_norm_fwd,
        "residual, delta (..., n), weight (n,), eps -> (residual + delta, rms_norm(residual + delta), rstd)",
        pybind11::arg("residual"), pybind11::arg("delta"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rms_norm_bwd", &lime::cpu::rms_norm_bwd,
        "dy, x (..., n), weight (n,), rstd (...), weight_grad, residual_grad -> (dx, dw); dw is empty (0,) without "
        "weight_grad; dx includes residual_grad when given",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("rstd"),
        pybind11::arg("weight_grad") = true, pybind11::arg("residual_grad") = pybind11::none());
  m.def("silu_fwd", &lime::cpu::silu_fwd, "x -> x * sigmoid(x)", pybind11::arg("x"));
  m.def("silu_bwd", &lime::cpu::silu_bwd, "dy, x -> dy * s * (1 + x * (1 - s)), s = sigmoid(x)",
        pybind11::arg("dy"), pybind11::arg("x"));
}
