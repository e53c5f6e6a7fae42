"""RMSNorm, y = x / sqrt(mean(x^2 over the last dim) + eps) * weight, and residual add + RMSNorm.

Layers, from the metal up:
    csrc/kernels/{cpu,cuda}      the kernels, registered in C++ as the operators lime::rms_norm_fwd,
                                 lime::add_rms_norm_fwd and lime::rms_norm_bwd, with their autograd in C++
                                 (csrc/kernels/cpu/autograd.cpp: saves x or h, weight and rstd, one fp32
                                 per row; the backward is lime::rms_norm_bwd): no Python between the
                                 dispatcher and the kernels
    register_operators()         their fake implementations (torch.compile traces them)
    rms_norm, add_rms_norm       the public functions: fused, PyTorch's own op (where it measured faster
                                 at a shape on CUDA), apex or the reference, per device
    rms_norm_ref, add_rms_norm_ref  the pure-PyTorch references the kernels are tested against

add_rms_norm fuses the residual add of a pre-norm Transformer block into the norm that follows it
(as apex, Transformer Engine and Megatron do): `h = residual + delta; y = rms_norm(h)` reads the
residual stream once and returns both h (the new residual) and y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def add_rms_norm_ref(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of add_rms_norm: h = residual + delta (in their dtype), then rms_norm_ref(h).

    residual, delta: (..., n); weight: (n,). Returns (h, y), both (..., n).
    """
    h = residual + delta
    return h, rms_norm_ref(h, weight, eps)


# ---- the operators' fake implementations (the operators and their autograd come from _kernels_cpu) ----

def _rms_norm_fwd_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"weight must have shape ({x.shape[-1]},) to match the last dimension of x")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = x.new_empty(x.shape[:-1], dtype=_accumulation_dtype(x.dtype))
    return y, rstd


def _add_rms_norm_fwd_fake(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(delta.shape == residual.shape and delta.dtype == residual.dtype,
                 lambda: "residual and delta must have the same shape and dtype")
    y, rstd = _rms_norm_fwd_fake(residual, weight, eps)
    return torch.empty_like(y), y, rstd


def _rms_norm_bwd_fake(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                       weight_grad: bool = True,
                       residual_grad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dweight


def register_operators() -> None:
    """Fake implementations of the lime:: RMSNorm operators (defined, with autograd, by _kernels_cpu)."""
    torch.library.register_fake("lime::rms_norm_fwd", _rms_norm_fwd_fake)
    torch.library.register_fake("lime::add_rms_norm_fwd", _add_rms_norm_fwd_fake)
    torch.library.register_fake("lime::rms_norm_bwd", _rms_norm_bwd_fake)


# ---- the public functions ----

def _apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    apex = _backend.SELECTION.apex
    if x.dtype == weight.dtype:
        return apex.fused_rms_norm_affine(x, weight, weight.shape, eps)
    # Mixed dtypes (bf16 activations, fp32 weight): apex returns the weight's dtype; we keep x's.
    return apex.mixed_dtype_fused_rms_norm_affine(x, weight, weight.shape, eps).to(x.dtype)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch's own op, the same maths (fp32 statistics, one rounding); only chosen when dtypes match."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _torch_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = residual + delta
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, fused where a kernel exists for x's device.

    x:      (..., n) any float dtype (fp32, bf16, fp16; fp64 on CPU), any strides (made contiguous).
    weight: (n,) the gain; its dtype may differ from x's (fp32 master weights with bf16 activations).
    eps:    added to mean(x^2) before the square root.
    Returns (..., n) in x's dtype; the statistics are accumulated in fp32.
    Gradients flow to x ((..., n), x's dtype) and weight ((n,), weight's dtype).
    On CUDA, PyTorch's F.rms_norm is used instead at a shape where it measured faster (_backend.CHOICES).
    """
    device_type = x.device.type
    backend = _backend.SELECTION.by_device_type.get(device_type, _backend.REFERENCE)
    if backend is _backend.FUSED:
        if (_backend.CHOICES.measures(device_type) and x.dtype == weight.dtype
                and _backend.CHOICES.use_torch("rms_norm", x, weight, eps)):
            return _torch_rms_norm(x, weight, eps)
        return _backend.RMS_NORM_FWD(x.contiguous(), weight, eps)[0]
    if backend is _backend.APEX:
        return _apex_rms_norm(x, weight, eps)
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1] if x.dim() else '?'},) to match the last "
                         f"dimension of x {tuple(x.shape)}, got {tuple(weight.shape)}")
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + delta and rms_norm(h, weight, eps) in one pass over the residual stream.

    residual: (..., n) the residual stream; delta: (..., n) what a block adds to it (same dtype,
    else the add and the norm run unfused, with PyTorch's type promotion); weight: (n,).
    Returns (h, y): h = residual + delta in their dtype (the new residual stream), y = rms_norm(h)
    in h's dtype. Gradients flow to residual, delta (both the gradient reaching h plus the norm's)
    and weight.
    """
    device_type = residual.device.type
    backend = _backend.SELECTION.by_device_type.get(device_type, _backend.REFERENCE)
    if backend is _backend.FUSED and residual.dtype == delta.dtype and residual.shape == delta.shape:
        if (_backend.CHOICES.measures(device_type) and residual.dtype == weight.dtype
                and _backend.CHOICES.use_torch("add_rms_norm", residual, weight, eps, delta)):
            return _torch_add_rms_norm(residual, delta, weight, eps)
        h, y, _ = _backend.ADD_RMS_NORM_FWD(residual.contiguous(), delta.contiguous(), weight, eps)
        return h, y
    h = residual + delta
    return h, rms_norm(h, weight, eps)
