"""SiLU (swish): y = x * sigmoid(x), the activation of LIME's MLP (which has no bias).

Layers, from the metal up:
    csrc/kernels/{cpu,cuda}     the kernels (pybind11 modules _kernels_cpu, _kernels_cuda)
    lime::silu_fwd / _bwd       torch custom ops with fake implementations (torch.compile traces them)
    SiLUFunction                autograd.Function: saves x; backward is one fused pass
    silu                        the public function: picks fused / reference per device (the model's MLP calls it)
    silu_ref                    the pure-PyTorch reference the kernels are tested against
"""

from __future__ import annotations

import torch

from megatron_lime.kernels import _backend


def silu_ref(x: torch.Tensor) -> torch.Tensor:
    """The reference: x * sigmoid(x) in fp32 (fp64 for fp64 inputs). x: any shape; returns x's shape and dtype."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (xf * torch.sigmoid(xf)).to(x.dtype)


@torch.library.custom_op("lime::silu_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def silu_fwd(x: torch.Tensor) -> torch.Tensor:
    """x contiguous, any shape -> x * sigmoid(x), same shape and dtype."""
    return _backend.extension_for(x.device).silu_fwd(x)


@silu_fwd.register_fake
def _silu_fwd_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lime::silu_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def silu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy, x (same shape) -> dy * s * (1 + x * (1 - s)), s = sigmoid(x)."""
    return _backend.extension_for(x.device).silu_bwd(dy, x)


@silu_bwd.register_fake
def _silu_bwd_fake(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class SiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)
        return torch.ops.lime.silu_fwd(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.lime.silu_bwd(dy.contiguous(), x)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, fused where a kernel exists for x's device.

    x: any shape, e.g. (b, s, ffn_hidden_size); fp32, bf16, fp16 (fp64 on CPU); any strides.
    Returns the same shape and dtype; arithmetic in fp32. The gradient has x's shape and dtype.
    With the apex backend on CUDA (apex has no SiLU) and with the reference, torch's own silu
    maths is used.
    """
    if _backend.SELECTION.for_device(x.device) in (_backend.FUSED_CPU, _backend.FUSED_CUDA):
        return SiLUFunction.apply(x)
    return silu_ref(x)

