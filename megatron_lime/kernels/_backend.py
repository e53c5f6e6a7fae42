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

Per shape on CUDA (CHOICES): ours or PyTorch's own op (F.rms_norm, F.silu), whichever is faster at the
run's shapes. The choice is a plan made once before training (ShapeChoices.plan, called by training.wrap after
the model is wrapped): one recording forward lists the (op, shape, dtype) cases the run calls, each is timed
forward and backward outside any forward (never inside an activation checkpoint's recomputation, a compiled
trace or a CUDA graph capture), agreed by all ranks, kept on disk (files.cache_folder()/kernel_choices.json, per
device, torch, kernel build, dtype and shape: a second run reads it) and logged one line per case. A call then
only looks its choice up; a shape the plan did not see takes the nearest planned shape's choice. LIME_KERNEL_CHOICE
forces it:

    LIME_KERNEL_CHOICE=measure  (default) as above
    LIME_KERNEL_CHOICE=ours     always our kernels
    LIME_KERNEL_CHOICE=torch    always PyTorch's op where one exists (dtypes of x and weight equal)

CPU tensors use our CPU kernels (their choice is the backend's, above), unless LIME_KERNEL_CHOICE_DEVICES=cpu
makes the CPU follow the same plan (the tests' switch: every step of the GPU path runs on a CPU).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from megatron_lime.files import cache_folder, write_json

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



# ---- ours or PyTorch's op, per shape: a plan made once before training, looked up on every call ----

def ms_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Milliseconds per call of fn over `calls` back-to-back calls, as the device spends them: CUDA events on the
    current stream for a CUDA device (a host clock would add the launch latency), the host clock elsewhere (a CPU
    runs the op in the call). The one device timer: the kernel plan's, and the benchmarks' (bench_common.py)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000.0 * (time.perf_counter() - began) / calls


def measure_ms(fn: Callable[[], object], device: torch.device, calls: int = 10, rounds: int = 3) -> float:
    """Milliseconds per call of fn after two warm-up calls (first-call allocations, lazy initialisation): the
    median of `rounds` rounds of `calls` back-to-back calls (ms_per_call)."""
    for _ in range(2):
        fn()
    return statistics.median(ms_per_call(fn, device, calls) for _ in range(rounds))


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


# (op, rows, n, dtype): an op's input x seen as `rows` rows of `n` (x.numel() = rows * n), so (b, s, d) and
# (b * s, d) are the same case, as they are to the kernels.
ChoiceKey = tuple[str, int, int, torch.dtype]
CACHE_FORMAT = 1  # bump when the cache file's layout or meaning changes


def choice_key(op: str, x: torch.Tensor) -> ChoiceKey:
    n = x.shape[-1] if x.dim() else 1
    return (op, x.numel() // max(n, 1), n, x.dtype)


def _inputs_for(key: ChoiceKey, device: torch.device) -> tuple:
    """Random inputs of an op at `key`'s shape, in the argument order of CHOICES.candidates[op]."""
    op, rows, n, dtype = key
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    if op == "rms_norm":
        return randn(rows, n), randn(n), 1e-5
    if op == "add_rms_norm":
        return randn(rows, n), randn(n), 1e-5, randn(rows, n)
    return (randn(rows, n),)


def _build_id(module: ModuleType | None) -> str:
    """A short hash of an extension's file: a rebuilt kernel is a new cache entry."""
    path = getattr(module, "__file__", None)
    if not path:
        return "none"
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=8).hexdigest()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"{device.type} {platform.machine()} x{torch.get_num_threads()} threads"


@dataclass
class ShapeChoices:
    """Ours or PyTorch's op, per (op, shape, dtype): planned once before training, then only looked up.

    `plan` runs one forward that records which (op, shape, dtype) the run calls (nothing is timed inside a
    forward, an activation checkpoint's recomputation or a graph capture), then times ours against PyTorch's
    op at each of them outside any forward, agrees the choice over all ranks, keeps it on disk per (device,
    torch, kernel build, dtype, shape, and whether PyTorch's op was timed compiled) and logs it. A call at a
    shape the plan did not see (evaluation, generation) takes the choice of the nearest planned shape (same
    op, width and dtype; rows compared on a log scale) without timing, and ours when there is none; lookups
    never add entries.

    mode:       "measure", "ours" or "torch" (LIME_KERNEL_CHOICE).
    timer:      milliseconds per call of a no-argument function on a device (tests pass a fake).
    devices:    the device types whose calls follow the plan (LIME_KERNEL_CHOICE_DEVICES, default CUDA's;
                "cpu" makes CPU runs take the same path, so tests run it).
    candidates: op name -> (ours, PyTorch's), functions of the op's inputs (registered by the op modules).
    """

    mode: str = "measure"
    timer: Callable[[Callable[[], object], torch.device], float] = measure_ms
    devices: tuple[str, ...] = ("cuda",)
    candidates: dict[str, tuple[Callable, Callable]] = field(default_factory=dict)
    choices: dict[ChoiceKey, str] = field(default_factory=dict)  # -> "ours" | "torch"
    recording: set[ChoiceKey] | None = None  # during plan's recording forward: the keys called

    def __post_init__(self) -> None:
        if self.mode not in CHOICE_MODES:
            raise ValueError(f"LIME_KERNEL_CHOICE={self.mode!r} is not one of {', '.join(CHOICE_MODES)}")

    def measures(self, device_type: str) -> bool:
        return device_type in self.devices

    def use_torch(self, op: str, x: torch.Tensor, *rest: object) -> bool:
        """True when PyTorch's op is to be used for op(x, *rest) (x decides the shape and dtype). A lookup only."""
        if self.mode != "measure":
            return self.mode == "torch"
        key = choice_key(op, x)
        if self.recording is not None and not torch.compiler.is_compiling():
            self.recording.add(key)
            return False
        choice = self.choices.get(key)
        if choice is None:
            choice = self.nearest(key)
        return choice == "torch"

    def nearest(self, key: ChoiceKey) -> str:
        """The choice of the planned shape nearest to key's (same op, width and dtype), "ours" when none."""
        op, rows, n, dtype = key
        planned = [(abs(math.log(max(other[1], 1)) - math.log(max(rows, 1))), choice)
                   for other, choice in self.choices.items() if other[0] == op and other[2] == n and other[3] == dtype]
        return min(planned, key=lambda item: item[0])[1] if planned else "ours"

    def plan(self, run_forward: Callable[[], object], device: torch.device, compiled: bool = False) -> dict:
        """Record the (op, shape, dtype) cases of one call of run_forward, then choose for each (see the class).

        run_forward: one forward of the model as the run calls it (the caller disables autograd, compilation
        and activation checkpointing around it). compiled: the run is torch.compile'd, so PyTorch's op is timed
        compiled, as Inductor will run it. Collective when torch.distributed is initialised: every rank calls it.
        Returns {key: (ours ms, PyTorch's ms, "ours" | "torch", "measured" | "cached")}.
        """
        if self.mode != "measure" or not self.measures(device.type):
            return {}
        self.recording = set()
        try:
            run_forward()
            keys = sorted(self.recording, key=lambda k: (k[0], k[1], k[2], str(k[3])))
        finally:
            self.recording = None
        identity = (f"{_device_name(device)}|torch {torch.__version__}|build {_build_id(self._extension(device))}"
                    f"{'|against compiled' if compiled else ''}")
        cached = _read_choice_cache(identity)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # rank 0's cases and cache decide, so that every rank times (and chooses) the same
            shared = [keys, {key: cached[key] for key in keys if key in cached}]
            torch.distributed.broadcast_object_list(shared, src=0)
            keys, cached = shared
        missing = [key for key in keys if key not in cached]
        times = torch.tensor([self._time(key, device, compiled) for key in missing], dtype=torch.float64,
                             device=device).reshape(-1, 2)
        if distributed and missing:  # the mean over ranks: one decision everywhere
            torch.distributed.all_reduce(times)
            times /= torch.distributed.get_world_size()
        result = {key: (*cached[key], "cached") for key in keys if key in cached}
        result.update({key: (ours, theirs, "measured") for key, (ours, theirs) in zip(missing, times.tolist())})
        for key in keys:
            ours_ms, torch_ms, source = result[key]
            choice = "torch" if torch_ms < ours_ms else "ours"
            self.choices[key] = choice
            result[key] = (ours_ms, torch_ms, choice, source)
            logger.info("kernel choice: %s (%d, %d) %s: ours %.4f ms, PyTorch's%s %.4f ms (forward+backward, %s): "
                        "using %s", key[0], key[1], key[2], str(key[3]).removeprefix("torch."), ours_ms,
                        " compiled" if compiled else "", torch_ms, source,
                        "PyTorch's" if choice == "torch" else "ours")
        if missing and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one writer per machine
            _write_choice_cache(identity, {key: result[key][:2] for key in keys})
        return result

    def _extension(self, device: torch.device) -> ModuleType | None:
        return SELECTION.cuda_extension if device.type == "cuda" else SELECTION.cpu_extension

    def _time(self, key: ChoiceKey, device: torch.device, compiled: bool) -> tuple[float, float]:
        ours, theirs = self.candidates[key[0]]
        if compiled:
            theirs = torch.compile(theirs, dynamic=False)
        inputs = _inputs_for(key, device)
        return (self.timer(forward_backward(ours, inputs), device),
                self.timer(forward_backward(theirs, inputs), device))


def _choice_cache_path():
    folder = cache_folder()
    return None if folder is None else folder / "kernel_choices.json"


def _entry_name(identity: str, key: ChoiceKey) -> str:
    return f"{identity}|{key[0]}|{key[1]}x{key[2]}|{str(key[3]).removeprefix('torch.')}"


def _read_choice_cache(identity: str) -> dict[ChoiceKey, tuple[float, float]]:
    """{key: (ours ms, PyTorch's ms)} of this device, torch and kernel build; {} when none or unreadable."""
    path = _choice_cache_path()
    if path is None or not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        entries = stored["entries"] if stored.get("format") == CACHE_FORMAT else {}
    except (OSError, ValueError, KeyError, AttributeError) as error:
        logger.warning("kernel choice cache %s is unreadable (%s): measuring again", path, error)
        return {}
    found = {}
    for name, times in entries.items():
        head, _, rest = name.rpartition("|")  # head: identity|op|shape
        identity_and_op, _, shape = head.rpartition("|")
        stored_identity, _, op = identity_and_op.rpartition("|")
        dtype = getattr(torch, rest, None)
        if stored_identity != identity or not isinstance(dtype, torch.dtype):
            continue
        rows, _, n = shape.partition("x")
        found[(op, int(rows), int(n), dtype)] = (float(times[0]), float(times[1]))
    return found


def _write_choice_cache(identity: str, times: dict[ChoiceKey, tuple[float, float]]) -> None:
    path = _choice_cache_path()
    if path is None:
        return
    try:
        entries = {}
        if path.exists():
            stored = json.loads(path.read_text())
            entries = stored.get("entries", {}) if stored.get("format") == CACHE_FORMAT else {}
        entries.update({_entry_name(identity, key): list(value) for key, value in times.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": CACHE_FORMAT, "entries": entries})
    except (OSError, ValueError) as error:  # the choice stands for this run; only the next one measures again
        logger.warning("kernel choice cache %s could not be written (%s)", path, error)


def _choice_devices() -> tuple[str, ...]:
    value = os.environ.get("LIME_KERNEL_CHOICE_DEVICES", "cuda")
    return tuple(part.strip() for part in value.split(",") if part.strip())


CHOICES = ShapeChoices(mode=(os.environ.get("LIME_KERNEL_CHOICE", "measure").strip().lower() or "measure"),
                       devices=_choice_devices())
