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

The extensions register the kernels as the operators torch.ops.lime.* (_kernels_cpu defines them,
_kernels_cuda adds CUDA implementations); RMS_NORM_FWD and the others below are those operators'
overloads, resolved once, so a call goes straight to the dispatcher.

Per shape on CUDA (CHOICES): the first call of an op at a new (shape, dtype) times ours against
PyTorch's own op (F.rms_norm, F.silu) with CUDA events, forward and backward, keeps the faster and
logs one line; so ours is never the slower choice. LIME_KERNEL_CHOICE forces it:

    LIME_KERNEL_CHOICE=measure  (default) as above
    LIME_KERNEL_CHOICE=ours     always our kernels
    LIME_KERNEL_CHOICE=torch    always PyTorch's op where one exists (dtypes of x and weight equal)

CPU tensors always use our CPU kernels (their choice is the backend's, above). While torch.compile
traces, or a CUDA graph is being captured, nothing can be timed: ours is used, never a cached
winner, so a compiled graph does not depend on what eager calls measured before.
"""

from __future__ import annotations

import importlib
import logging
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

logger = logging.getLogger("megatron_lime.kernels")

FUSED_CPU = "fused-cpu"
FUSED_CUDA = "fused-cuda"
APEX = "apex"
REFERENCE = "reference"
FUSED = "fused"  # ours, on whichever device: what Selection.by_device_type holds for FUSED_CPU / FUSED_CUDA

MODES = ("auto", "reference", "fused", "apex")
CHOICE_MODES = ("measure", "ours", "torch")


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
        module.add_rms_norm_fwd(x, x, weight, 1e-5)
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
    # {"cpu": FUSED | REFERENCE, "cuda": FUSED | APEX | REFERENCE}: the public functions' one lookup per call.
    by_device_type: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        kinds = {FUSED_CPU: FUSED, FUSED_CUDA: FUSED, APEX: APEX, REFERENCE: REFERENCE}
        object.__setattr__(self, "by_device_type", {"cpu": kinds[self.cpu], "cuda": kinds[self.cuda]})

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
        raise KernelsUnavailableError(f"LIME_KERNELS=apex asks for apex's FusedRMSNorm, but it did not import "
                                      f"({apex.describe()})") from apex.error

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


# The forward operators' overloads, resolved once (an OpOverloadPacket call looks the overload up every
# time); the backward operators are called by the C++ autograd (csrc/kernels/cpu/autograd.cpp).
# They exist once _kernels_cpu has been imported (it defines them); None otherwise, and then
# SELECTION chose no fused backend, so nothing calls them.
if SELECTION.cpu_extension is not None:
    RMS_NORM_FWD = torch.ops.lime.rms_norm_fwd.default
    ADD_RMS_NORM_FWD = torch.ops.lime.add_rms_norm_fwd.default
    SILU_FWD = torch.ops.lime.silu_fwd.default
else:
    RMS_NORM_FWD = ADD_RMS_NORM_FWD = SILU_FWD = None


def cuda_event_timer(fn: Callable[[], object], calls: int = 10, rounds: int = 3) -> float:
    """Milliseconds per call of fn on the current CUDA stream: CUDA events around `calls`
    back-to-back calls (a host clock would add the launch latency), the median of `rounds`."""
    for _ in range(2):  # warm-up: first-call allocations, lazy initialisation
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def forward_backward(fn: Callable[..., object], inputs: tuple) -> Callable[[], None]:
    """A call of fn(*inputs) and the backward of all its outputs, on detached copies of the
    floating-point inputs (the caller's tensors and graph are left alone)."""
    leaves = tuple(t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in inputs)
    differentiable = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.enable_grad():
        outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.ones_like(o) for o in outputs]

    def run() -> None:
        with torch.enable_grad():
            out = fn(*leaves)
            torch.autograd.grad(out if isinstance(out, tuple) else (out,), differentiable, grads)

    return run


@dataclass
class ShapeChoices:
    """Ours or PyTorch's op, per (op, shape, dtype): measured on the first call, cached, logged once.

    mode:       "measure", "ours" or "torch" (LIME_KERNEL_CHOICE).
    timer:      milliseconds per call of a no-argument function (CUDA events; tests pass a fake).
    devices:    the device types whose calls are measured (CUDA's; CPU keeps our kernels).
    candidates: op name -> (ours, PyTorch's), functions of the op's inputs (registered by the op modules).
    """

    mode: str = "measure"
    timer: Callable[[Callable[[], object]], float] = cuda_event_timer
    devices: tuple[str, ...] = ("cuda",)
    candidates: dict[str, tuple[Callable, Callable]] = field(default_factory=dict)
    choices: dict[tuple, str] = field(default_factory=dict)  # (op, shape, dtype) -> "ours" | "torch"

    def __post_init__(self) -> None:
        if self.mode not in CHOICE_MODES:
            raise ValueError(f"LIME_KERNEL_CHOICE={self.mode!r} is not one of {', '.join(CHOICE_MODES)}")

    def measures(self, device_type: str) -> bool:
        return device_type in self.devices

    def use_torch(self, op: str, x: torch.Tensor, *rest: object) -> bool:
        """True when PyTorch's op is to be used for op(x, *rest) (x decides the shape and dtype)."""
        if self.mode != "measure":
            return self.mode == "torch"
        if torch.compiler.is_compiling():
            return False  # no timing while tracing, and no dependence of the graph on eager history
        key = (op, x.shape, x.dtype)
        choice = self.choices.get(key)
        if choice is None:
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return False  # a CUDA graph being captured: no events, no synchronisation
            choice = self._measure(op, key, (x, *rest))
        return choice == "torch"

    def _measure(self, op: str, key: tuple, inputs: tuple) -> str:
        ours, theirs = self.candidates[op]
        ours_ms = self.timer(forward_backward(ours, inputs))
        torch_ms = self.timer(forward_backward(theirs, inputs))
        choice = "torch" if torch_ms < ours_ms else "ours"
        self.choices[key] = choice
        logger.info("%s %s %s: ours %.4f ms, PyTorch's %.4f ms (forward+backward): using %s", op,
                    tuple(key[1]), str(key[2]).removeprefix("torch."), ours_ms, torch_ms,
                    "PyTorch's" if choice == "torch" else "ours")
        return choice


CHOICES = ShapeChoices(mode=(os.environ.get("LIME_KERNEL_CHOICE", "measure").strip().lower() or "measure"))
