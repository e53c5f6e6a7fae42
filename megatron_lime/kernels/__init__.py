"""Fused RMSNorm and SiLU kernels (C++ for CPU, CUDA for GPU), with pure-PyTorch references.

    from megatron_lime import kernels
    y = kernels.rms_norm(x, weight, eps)   # x (..., n), weight (n,) -> (..., n)
    h = kernels.silu(x)                    # any shape -> same shape
    kernels.backend()                      # e.g. "fused-cpu": what the default device uses

The backend is chosen once at import (see _backend.py: LIME_KERNELS=auto|reference|fused|apex)
and dispatched per tensor device, so CPU tensors take the CPU kernels even on a GPU machine.
"""

from __future__ import annotations

import torch

from megatron_lime.kernels import _backend
from megatron_lime.kernels._backend import KernelsUnavailableError
from megatron_lime.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_ref
from megatron_lime.kernels.silu import SiLUFunction, silu, silu_ref


def backend(device: torch.device | str | None = None) -> str:
    """The implementation used for tensors on `device`: "fused-cuda", "apex", "fused-cpu" or "reference".

    With no device: CUDA's when a GPU is present, else CPU's.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _backend.SELECTION.for_device(torch.device(device))


__all__ = [
    "KernelsUnavailableError", "RMSNormFunction", "SiLUFunction", "backend",
    "rms_norm", "rms_norm_ref", "silu", "silu_ref",
]
