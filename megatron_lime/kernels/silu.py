"""SiLU (swish): y = x * sigmoid(x), the activation of LIME's MLP (which has no bias).

Layers, from the metal up:
    csrc/kernels/{cpu,cuda}     the kernels, registered in C++ as the operators lime::silu_fwd and
                                lime::silu_bwd, with their autograd in C++ (csrc/kernels/cpu/autograd.cpp:
                                saves x; the backward is one fused pass): no Python between the
                                dispatcher and the kernels
    register_operators()        their fake implementations (torch.compile traces them)
    silu                        the public function: fused, PyTorch's own F.silu (where it measured
                                faster at a shape on CUDA) or the reference, per device
    silu_ref                    the pure-PyTorch reference the kernels are tested against
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lime.kernels import _backend


def silu_ref(x: torch.Tensor) -> torch.Tensor:
    """The reference: x * sigmoid(x) in fp32 (fp64 for fp64 inputs). x: any shape; returns x's shape and dtype."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (xf * torch.sigmoid(xf)).to(x.dtype)


def _silu_fwd_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _silu_bwd_fake(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    torch._check(dy.shape == x.shape, lambda: "dy and x must have the same shape")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def register_operators() -> None:
    """Fake implementations of lime::silu_fwd / lime::silu_bwd (defined, with autograd, by _kernels_cpu)."""
    torch.library.register_fake("lime::silu_fwd", _silu_fwd_fake)
    torch.library.register_fake("lime::silu_bwd", _silu_bwd_fake)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, fused where a kernel exists for x's device.

    x: any shape, e.g. (b, s, ffn_hidden_size); fp32, bf16, fp16 (fp64 on CPU); any strides.
    Returns the same shape and dtype; arithmetic in fp32. The gradient has x's shape and dtype.
    On CUDA, F.silu (the same maths) is used instead at a shape where it measured faster
    (_backend.CHOICES); with the apex backend (apex has no SiLU) and the reference, silu_ref.
    """
    device_type = x.device.type
    if _backend.SELECTION.by_device_type.get(device_type, _backend.REFERENCE) is _backend.FUSED:
        if _backend.CHOICES.measures(device_type) and _backend.CHOICES.use_torch("silu", x):
            return F.silu(x)
        return _backend.SILU_FWD(x.contiguous())
    return silu_ref(x)
