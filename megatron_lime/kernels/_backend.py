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

An extension that imports may still have no machine code for this GPU (built for sm_80/sm_90,
run on a newer one without usable PTX): the first launch would fail with "no kernel image is
available". So choosing the CUDA extension includes one tiny launch of each op on this
process's GPU (LOCAL_RANK's under a launcher, so no rank creates a context on another GPU);
when it fails, auto mode warns and falls back to the next backend, LIME_KERNELS=fused raises.
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


def _probe_cuda_launch(module: ModuleType) -> BaseException | None:
    """Launch each CUDA op once on a tiny tensor of this process's GPU; the error, or None when they ran."""
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
        index = local_rank if 0 <= local_rank < torch.cuda.device_count() else torch.cuda.current_device()
        x = torch.linspace(-2.0, 2.0, 16, device=torch.device("cuda", index)).view(2, 8)  # no RNG state used
        weight = torch.ones(8, device=x.device)
        y, rstd = module.rms_norm_fwd(x, weight, 1e-5)
        module.rms_norm_bwd(x, x, weight, rstd, True)
        module.silu_bwd(x, module.silu_fwd(x))
        torch.cuda.synchronize(x.device)
        return None
    except Exception as error:  # "no kernel image is available for execution on the device", ...
        return error


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
    if cuda_ext.module is not None and mode in ("auto", "fused"):
        launch_error = _probe_cuda_launch(cuda_ext.module)
        if launch_error is not None:
            name = torch.cuda.get_device_name()
            cuda_ext = LoadResult(None, RuntimeError(
                f"megatron_lime._kernels_cuda imported but its kernels do not run on this GPU ({name}): "
                f"{type(launch_error).__name__}: {launch_error}; rebuild it for this GPU's architecture "
                f"(LIME_CUDA_ARCHS, see setup.py)"))
    apex = _load_apex_rms_norm() if cuda_present and mode in ("auto", "apex") else LoadResult(None, None)

    if mode in ("fused", "apex") and cpu_ext.module is None:
        raise KernelsUnavailableError(
            f"LIME_KERNELS={mode} asks for the fused CPU kernels, but megatron_lime._kernels_cpu did not import "
            f"({cpu_ext.describe()}); {BUILD_HINT}") from cpu_ext.error
    if mode == "fused" and cuda_present and cuda_ext.module is None:
        raise KernelsUnavailableError(
            f"LIME_KERNELS=fused asks for the fused CUDA kernels, but megatron_lime._kernels_cuda is not usable "
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
