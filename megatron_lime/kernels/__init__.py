"""Fused RMSNorm, residual add + RMSNorm and SiLU kernels (C++ for CPU, CUDA for GPU), with pure-PyTorch
references.

    from megatron_lime import kernels
    y = kernels.rms_norm(x, weight, eps)              # x (..., n), weight (n,) -> (..., n)
    h, y = kernels.add_rms_norm(x, delta, weight, eps)  # h = x + delta, y = rms_norm(h): one read of x
    a = kernels.silu(x)                               # any shape -> same shape
    kernels.backend()                                 # e.g. "fused-cpu": what the default device uses
    kernels.ms_per_call(fn, device, calls)            # the one device timer (the plan's and the benchmarks')

The backend is chosen once at import (see _backend.py: LIME_KERNELS=auto|reference|fused|apex)
and dispatched per tensor device, so CPU tensors take the CPU kernels even on a GPU machine; on
CUDA, per shape, PyTorch's own op where it measured faster in the plan made before training
(plan_kernel_choices; LIME_KERNEL_CHOICE=measure|ours|torch).
"""

from __future__ import annotations

import torch

from megatron_lime.kernels import _backend, rms_norm as _rms_norm_module, silu as _silu_module
from megatron_lime.kernels._backend import KernelsUnavailableError, ms_per_call
from megatron_lime.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from megatron_lime.kernels.silu import silu, silu_ref

if _backend.SELECTION.cpu_extension is not None:  # it defines the lime:: operators
    _rms_norm_module.register_operators()
    _silu_module.register_operators()

# What the per-shape choice on CUDA times against each other: our operators and PyTorch's ops.
_backend.CHOICES.candidates.update({
    "rms_norm": (lambda x, w, eps: _backend.RMS_NORM_FWD(x.contiguous(), w, eps)[0],
                 _rms_norm_module._torch_rms_norm),
    "add_rms_norm": (lambda r, w, eps, d: _backend.ADD_RMS_NORM_FWD(r.contiguous(), d.contiguous(), w, eps)[:2],
                     lambda r, w, eps, d: _rms_norm_module._torch_add_rms_norm(r, d, w, eps)),
    "silu": (lambda x: _backend.SILU_FWD(x.contiguous()), torch.nn.functional.silu),
})


def set_kernel_choice(mode: str) -> str:
    """Force (or restore) the per-shape choice on CUDA: "measure", "ours" or "torch" (as LIME_KERNEL_CHOICE).

    Returns the previous mode. Benchmarks set "ours" so that their row for our kernels measures ours.
    """
    if mode not in _backend.CHOICE_MODES:
        raise ValueError(f"kernel choice {mode!r} is not one of {', '.join(_backend.CHOICE_MODES)}")
    previous, _backend.CHOICES.mode = _backend.CHOICES.mode, mode
    return previous


def plan_kernel_choices(run_forward, device: torch.device | str, compiled: bool = False) -> dict:
    """Choose ours or PyTorch's op for every (op, shape, dtype) one call of run_forward makes, before training.

    run_forward: one forward as the run calls it, with autograd, compilation and activation checkpointing
    off (the caller's business); nothing is timed inside it. The cases are then timed outside any forward,
    agreed over all ranks when torch.distributed is initialised (a collective: every rank calls this), kept
    on disk and logged; later calls only look their choice up (_backend.ShapeChoices). A no-op where the
    device's calls do not follow a plan (CPU by default) or the choice is forced (LIME_KERNEL_CHOICE).
    Returns {(op, rows, width, dtype): (ours ms, PyTorch's ms, "ours" | "torch", "measured" | "cached")}.
    """
    return _backend.CHOICES.plan(run_forward, torch.device(device), compiled)


def backend(device: torch.device | str | None = None) -> str:
    """The implementation used for tensors on `device`: "fused-cuda", "apex", "fused-cpu" or "reference".

    With no device: CUDA's when a GPU is present, else CPU's.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _backend.SELECTION.for_device(torch.device(device))


__all__ = [
    "KernelsUnavailableError", "add_rms_norm", "add_rms_norm_ref", "backend", "ms_per_call", "rms_norm",
    "rms_norm_ref", "plan_kernel_choices", "set_kernel_choice", "silu", "silu_ref",
]
