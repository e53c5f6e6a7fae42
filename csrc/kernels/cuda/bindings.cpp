// megatron_lime._kernels_cuda: the CUDA fused kernels, registered as the CUDA implementations of
// the lime:: operators (their schemas are defined by _kernels_cpu, csrc/kernels/cpu/bindings.cpp),
// so torch.ops.lime.* reaches them through the dispatcher with no Python in between. The pybind11
// functions are the same kernels by name (the launch probe in megatron_lime/kernels/_backend.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(lime, CUDA, m) {
  m.impl("rms_norm_fwd", &lime::cuda::rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &lime::cuda::add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &lime::cuda::rms_norm_bwd);
  m.impl("silu_fwd", &lime::cuda::silu_fwd);
  m.impl("silu_bwd", &lime::cuda::silu_bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused RMSNorm, residual add + RMSNorm and SiLU for CUDA tensors (fp32, bf16, fp16, fp64; fp32 "
            "accumulation).";
  m.def("rms_norm_fwd", &lime::cuda::rms_norm_fwd, "x (..., n), weight (n,), eps -> (y (..., n), rstd (...))",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("add_rms_norm_fwd", &lime::cuda::add_rms_norm_fwd,
        "residual, delta (..., n), weight (n,), eps -> (residual + delta, rms_norm(residual + delta), rstd)",
        pybind11::arg("residual"), pybind11::arg("delta"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("rms_norm_bwd", &lime::cuda::rms_norm_bwd,
        "dy, x (..., n), weight (n,), rstd (...), weight_grad, residual_grad -> (dx, dw); dw is empty (0,) without "
        "weight_grad; dx includes residual_grad when given",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("rstd"),
        pybind11::arg("weight_grad") = true, pybind11::arg("residual_grad") = pybind11::none());
  m.def("silu_fwd", &lime::cuda::silu_fwd, "x -> x * sigmoid(x)", pybind11::arg("x"));
  m.def("silu_bwd", &lime::cuda::silu_bwd, "dy, x -> dy * s * (1 + x * (1 - s)), s = sigmoid(x)",
        pybind11::arg("dy"), pybind11::arg("x"));
}
