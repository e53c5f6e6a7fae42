"""Which implementation the fused ops use, chosen once at import and logged once.

Per device type, in order of preference:

    cuda: megatron_lime._kernels_cuda (ours)  >  apex FusedRMSNorm (if installed)  >  reference
    cpu:  megatron_lime._kernels_cpu (ours)                                         >  reference

Other devices (meta, mps, ...) use the reference. The environment variable LIME_KERNELS
overrides the choice:

    LIME_KERNELS=auto       (default) the order above; a missing extension is logged, with its error
    LIME_KERNELS=reference  the pure-PyTorch references everywhere
    LIME_KERNELS=fused      our extensions, required: the import fails with the saved build/import error
    LIME_KERNELS=apex       apex's FusedRMSNorm on CUDA (required), our CPU extension on CPU

A CPU tensor always takes the CPU path, even on a machine with a GPU.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger("megatron_lime.kernels")

FUSED_CPU = "fused-cpu"
FUSED_CUDA = "fused-cuda"
APEX = "apex"
REFERENCE = "reference"

MODES = ("auto", "reference", "fused", "apex")


class KernelsUnavailableError(ImportError):
    """The fused kernels were asked for by name (LIME_KERNELS) but cannot be loaded."""


@dataclass(frozen=True)
class LoadResult:
    """An optional module and, when it could not be imported, why."""

    module: ModuleType | None
    error: BaseException | None

    def describe(self) -> str:
        return f"{type(self.error).__name__}: {self.error}" if self.error is not None else "loaded"


def _load(name: str) -> LoadResult:
    try:
        return LoadResult(importlib.import_module(name), None)
    except Exception as error:  # ImportError, or an OSError / undefined symbol from a mismatched build
        return LoadResult(None, error)


def _load_apex_rms_norm() -> LoadResult:
    try:
        from apex.normalization import fused_layer_norm  # noqa: PLC0415 - optional dependency
        return LoadResult(fused_layer_norm, None)
    except Exception as error:
        return LoadResult(None, error)


BUILD_HINT = ("build it with: cd <repo> && python setup.py build_ext --inplace "
              "(or pip install --no-build-isolation -e .)")


@dataclass(frozen=True)
class Selection:
    """The backend for each device type, and the modules behind them."""

    mode: str
    cpu: str
    cuda: str
    cpu_extension: ModuleType | None
    cuda_extension: ModuleType | None
    apex: ModuleType | None

    def for_device(self, device: torch.device) -> str:
        if device.type == "cpu":
            return self.cpu
        if device.type == "cuda":
            return self.cuda
        return REFERENCE


def select(mode: str | None = None) -> Selection:
    """Decide the backends. `mode` defaults to $LIME_KERNELS (or "auto")."""
    mode = (mode if mode is not None else os.environ.get("LIME_KERNELS", "auto")).strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"LIME_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    cuda_present = torch.cuda.is_available()
    if mode == "reference":
        return Selection(mode, REFERENCE, REFERENCE, None, None, None)

    cpu_ext = _load("megatron_lime._kernels_cpu")
    cuda_ext = _load("megatron_lime._kernels_cuda") if cuda_present else LoadResult(None, None)
    apex = _load_apex_rms_norm() if cuda_present and mode in ("auto", "apex") else LoadResult(None, None)

    if mode in ("fused", "apex") and cpu_ext.module is None:
        raise KernelsUnavailableError(
            f"LIME_KERNELS={mode} asks for the fused CPU kernels, but megatron_lime._kernels_cpu did not import "
            f"({cpu_ext.describe()}); {BUILD_HINT}") from cpu_ext.error
    if mode == "fused" and cuda_present and cuda_ext.module is None:
        raise KernelsUnavailableError(
            f"LIME_KERNELS=fused asks for the fused CUDA kernels, but megatron_lime._kernels_cuda did not import "
            f"({cuda_ext.describe()}); build with LIME_BUILD_CUDA=1 against a CUDA build of torch") from cuda_ext.error
    if mode == "apex" and cuda_present and apex.module is None:
        raise KernelsUnavailableError(
            f"LIME_KERNELS=apex asks for apex's FusedRMSNorm, but it did not import ({apex.describe()})") from apex.error

    cpu = FUSED_CPU if cpu_ext.module is not None else REFERENCE
    if not cuda_present:
        cuda = REFERENCE
    elif mode == "apex":
        cuda = APEX
    elif cuda_ext.module is not None:
        cuda = FUSED_CUDA
    elif apex.module is not None:
        cuda = APEX
    else:
        cuda = REFERENCE

    if cpu == REFERENCE:
        logger.warning("megatron_lime._kernels_cpu is not available (%s); CPU tensors use the reference "
                       "RMSNorm/SiLU. %s", cpu_ext.describe(), BUILD_HINT)
    if cuda_present and cuda != FUSED_CUDA:
        logger.warning("megatron_lime._kernels_cuda is not available (%s); CUDA tensors use %s",
                       cuda_ext.describe(), cuda)
    return Selection(mode, cpu, cuda, cpu_ext.module, cuda_ext.module, apex.module)


SELECTION: Selection = select()
logger.info("RMSNorm/SiLU kernels: cpu=%s, cuda=%s (LIME_KERNELS=%s)", SELECTION.cpu, SELECTION.cuda, SELECTION.mode)


def extension_for(device: torch.device) -> ModuleType:
    """Our compiled module for tensors on `device` (the custom ops call this)."""
    module = SELECTION.cpu_extension if device.type == "cpu" else SELECTION.cuda_extension
    if module is None:
        raise KernelsUnavailableError(
            f"the fused kernels for {device.type} tensors are not loaded (backend: "
            f"{SELECTION.for_device(device)}); call megatron_lime.kernels.rms_norm / silu, which fall back "
            f"to the reference, or {BUILD_HINT}")
    return module
