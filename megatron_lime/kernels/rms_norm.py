"""RMSNorm: y = x / sqrt(mean(x^2 over the last dim) + eps) * weight.

Layers, from the metal up:
    csrc/kernels/{cpu,cuda}     the kernels (pybind11 modules _kernels_cpu, _kernels_cuda)
    lime::rms_norm_fwd / _bwd   torch custom ops with fake implementations (torch.compile traces them)
    RMSNormFunction             autograd.Function: saves x, weight and rstd (one fp32 per row)
    rms_norm                    the public function: picks fused / apex / reference per device
                                (the model's RMSNorm module calls it)
    rms_norm_ref                the pure-PyTorch reference the kernels are tested against
"""

from __future__ import annotations

import torch

from megatron_lime.kernels import _backend


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: the same maths as the kernels, in fp32 (fp64 for fp64 inputs), several passes.

    x: (..., n); weight: (n,). Returns (..., n) in x's dtype.
    """
    acc = _accumulation_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return (xf * rstd * weight.to(acc)).to(x.dtype)


@torch.library.custom_op("lime::rms_norm_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) contiguous, weight (n,) -> y (..., n) in x's dtype, rstd (...) in fp32 (fp64 for fp64 x)."""
    return tuple(_backend.extension_for(x.device).rms_norm_fwd(x, weight, eps))


@rms_norm_fwd.register_fake
def _rms_norm_fwd_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = x.new_empty(x.shape[:-1], dtype=_accumulation_dtype(x.dtype))
    return y, rstd


@torch.library.custom_op("lime::rms_norm_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (..., n), weight (n,), rstd (...) -> dx (..., n) in x's dtype, dweight (n,) in weight's dtype.

    With weight_grad False no weight gradient is computed and dweight is an empty (0,) tensor.
    """
    return tuple(_backend.extension_for(x.device).rms_norm_bwd(dy, x, weight, rstd, weight_grad))


@rms_norm_bwd.register_fake
def _rms_norm_bwd_fake(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                       weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dweight


class RMSNormFunction(torch.autograd.Function):
    """Fused forward and backward; the backward needs only rstd besides the inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        y, rstd = torch.ops.lime.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]  # a frozen weight: skip the reduction over rows
        dx, dweight = torch.ops.lime.rms_norm_bwd(dy.contiguous(), x, weight, rstd, weight_grad)
        return dx, dweight if weight_grad else None, None


def _apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    apex = _backend.SELECTION.apex
    if x.dtype == weight.dtype:
        return apex.fused_rms_norm_affine(x, weight, weight.shape, eps)
    # Mixed dtypes (bf16 activations, fp32 weight): apex returns the weight's dtype; we keep x's.
    return apex.mixed_dtype_fused_rms_norm_affine(x, weight, weight.shape, eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, fused where a kernel exists for x's device.

    x:      (..., n) any float dtype (fp32, bf16, fp16; fp64 on CPU), any strides (made contiguous).
    weight: (n,) the gain; its dtype may differ from x's (fp32 master weights with bf16 activations).
    eps:    added to mean(x^2) before the square root.
    Returns (..., n) in x's dtype; the statistics are accumulated in fp32.
    Gradients flow to x ((..., n), x's dtype) and weight ((n,), weight's dtype).
    """
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1] if x.dim() else '?'},) to match the last "
                         f"dimension of x {tuple(x.shape)}, got {tuple(weight.shape)}")
    backend = _backend.SELECTION.for_device(x.device)
    if backend == _backend.REFERENCE:
        return rms_norm_ref(x, weight, eps)
    if backend == _backend.APEX:
        return _apex_rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)

