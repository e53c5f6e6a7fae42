// pybind11 module megatron_lime._kernels_cuda: the CUDA fused kernels, called by the torch
// custom ops in megatron_lime/kernels/ (which add autograd, fake tensors and dispatch).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused RMSNorm and SiLU for CUDA tensors (fp32, bf16, fp16, fp64; fp32 accumulation).";
  m.def("rms_norm_fwd", &lime::cuda::rms_norm_fwd, "x (..., n), weight (n,), eps -> (y (..., n), rstd (...))",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rms_norm_bwd", &lime::cuda::rms_norm_bwd,
        "dy, x (..., n), weight (n,), rstd (...), weight_grad -> (dx, dw); dw is empty (0,) without weight_grad",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("rstd"),
        pybind11::arg("weight_grad") = true);
  m.def("silu_fwd", &lime::cuda::silu_fwd, "x -> x * sigmoid(x)", pybind11::arg("x"));
  m.def("silu_bwd", &lime::cuda::silu_bwd, "dy, x -> dy * s * (1 + x * (1 - s)), s = sigmoid(x)",
        pybind11::arg("dy"), pybind11::arg("x"));
}
