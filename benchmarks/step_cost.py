"""A device-independent cost model of one optimizer step: ours (the DeepSpeed engine) beside the peer (a plain loop).

    python benchmarks/step_cost.py --json cost.json           # lime-1b's dims, recipe batch, both precisions
    python benchmarks/step_cost.py --precisions bf16          # one precision
    python benchmarks/step_cost.py --quick                    # lime-tiny, seq 64: what the test runs (seconds)

What is counted. A TorchDispatchMode (CostMode) sees every aten op and every custom op (torch.ops.lime.*: our fused
RMSNorm/SiLU kernels) that one optimizer step dispatches, after autograd and autocast, and counts per op:
  FLOPs     torch.utils.flop_counter's registry (mm, addmm, bmm, the SDPA kernels; the CPU's SDPA kernels with its
            formulas); attention counted full (s x s), as that registry does, though a causal kernel skips half.
            "matmul" ops are those with a FLOP formula; all other ops are "memory-bound".
  bytes     every tensor input read and every output written, once each per op; a dimension of stride 0 (a
            broadcast) is not counted; a tensor an op updates in place is read and written, except where the op
            only writes it (fill_, zero_, copy_'s destination, an out= argument: written only).
  launches  one kernel per op, except views and metadata ops (view, permute, transpose, expand, as_strided, slice,
            select, unbind, split, detach, alias, _reshape_alias, ...: 0 bytes, 0 launches) and allocations (empty*,
            0 launches). _foreach_* and _fused_adam(w)_ are CUDA multi-tensor-apply launches, simulated as
            ATen's MultiTensorApply.cuh packs them: 65,536 elements per block, at most 320 blocks and
            110/64/48/36/30 tensors (1 to 5 tensor lists) per launch; _foreach_norm adds 2 (its zeros and its
            cleanup kernel); a list that cannot take the fast path (mixed dtypes, not dense) is one launch per tensor.
            A collective (c10d) is one launch.
  host syncs aten._local_scalar_dense (.item()), nonzero, is_nonzero, equal, and every
            deepspeed.accelerator.get_accelerator().synchronize() called during the step.
  sites     the same bytes and launches per call site: the innermost Python frame outside torch (our model,
            DeepSpeed, transformers), or, for an op the autograd engine runs itself, its node (MmBackward0, ...).
Ops with FLOPs skip their arithmetic: their outputs are zeros of the shape, dtype and strides that the same op gives
on the meta device (in-place ones leave their tensor as it was, out= ones zero it). Values do not matter for counts;
zeros keep every value finite, so DeepSpeed's overflow check takes its normal path and the step is applied.

What runs. OURS: megatron_lime.training.pretrain.train_step (the loop's own step) on the engine that
training.wrap.wrap_model builds from parse_training_args with the recipe's --deepspeed-config
(examples/ds_config_zero1_bf16.json), one process (gloo, world size 1, DeepSpeed's CPU accelerator). The
optimizer is what wrap_model builds on a GPU (torch AdamW, fused=True; on a CPU it would pick the plain one).
THE PEER: build_peer of bench_gpu_peer.py and its loop, written here line for line (autocast bf16 around forward
+ loss, backward of loss / micro-batches, clip_grad_norm_(1.0), AdamW fused=True as on its GPU, zero_grad).
Everything runs on the CPU. Where our model picks a path by device type, the CUDA one is counted (cuda_paths: the
chunked loss's body, torch.compile'd on CUDA, as its 2 Inductor kernels; the GEMMs that write fp32 themselves;
--cpu-paths counts the CPU's instead). Other device-specific paths are the CPU's: autocast's CPU op lists (the
peer's LayerNorm and log-softmax see fp32 inputs either way), our CPU kernels (on CUDA the kernel plan may pick
F.rms_norm where it is faster) and DeepSpeed's CPU accelerator; collectives are those of one rank.

Extrapolation (lime-1b does not fit in a shared CPU's time): runs with the real dims and L in {1, 2} layers,
micro-batches of b in {B, 2B} sequences (B = one loss chunk: loss_chunk_size / seq, so chunks scale with b), one
and two micro-batches per step. Every count of every op is modelled as
    cost(L, b, acc) = A(L, b) + (acc - 1) * D(L, b),   A and D bilinear in (L, b):  c0 + c1 L + c2 b + c3 L b
(A: a step of one micro-batch, optimizer included; D: each further micro-batch, whose gradients accumulate),
solved exactly from the four (L, b) runs and evaluated at 32 layers and the recipe's batch. A run at 3 layers
checks it (printed, and the test checks it at tiny dims). Multi-tensor-apply launches are not exactly linear in L
(tensors pack into launches): the check shows the error.

JSON (--json): precisions.<bf16|autocast>.<ours|peer> holds memory_bytes_per_token, launches_per_token,
host_syncs_per_step, projected_h100_tokens_per_s (and the A100's, FLOPs, total bytes) at the first --shapes row
(16x4: the recipe); precisions.<p>.<MICROxACC>.<who> holds every row's figures, the top ops, every op's per-token
figures (ops_per_token) and where each host sync comes from; extrapolation_check, roofline and calibration_h200
say how far to trust them. The peer has one mode (fp32 weights + autocast), so its figures are the same under both.

Roofline: seconds per step = matmul FLOPs / (MATMUL_EFFICIENCY x matmul rate) + memory-bound bytes / copy
bandwidth + launches x LAUNCH_SECONDS, for an H100 SXM and an A100 80GB (rates below), summed, not overlapped, for
one rank of the recipe's 8 as if it were alone (world size 1: ZeRO-1's 8-way sharding of the optimizer step, which
would cut ours' optimizer bytes about 8-fold, and the collectives of 8 ranks are not modelled). The
two constants are fitted to the peer's two H200 rows of ../shared/gpu/MEASURED.md (mb16 and mb32, one micro-batch
per step, eager; --calibrate refits them); ours then (the code the H200 ran, about commit 39786a4, without the
recipe's DeepSpeed JSON) is the out-of-sample check:
    PYTHONPATH=<worktree of 39786a4 with its extension built> python benchmarks/step_cost.py --only ours \
        --precisions bf16 --ds-config none --shapes 16x1 32x1 --check-layers 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIG = os.path.join(REPO, "examples", "ds_config_zero1_bf16.json")
PRECISIONS = ("bf16", "autocast")
# The recipe at 8 GPUs (examples/pretrain_lime_1b.sh): 512 sequences per step = 64 per GPU, micro 16 x 4.
RECIPE_SHAPES = ((16, 4), (32, 2))

# ---------------------------------------------------------------------------------------------------------------
# Hardware constants. Measured on one H200 (../shared/gpu/MEASURED.md, 2026-12-04): bf16 8192^3 matmul 779-781
# TFLOP/s, device-to-device copy 3.7-4.0 TB/s (read + written); midpoints below. The H100 SXM and A100 80GB SXM
# rates are their datasheet figures scaled by the H200's measured fraction of its own datasheet (989 TFLOP/s dense
# bf16, 4.8 TB/s HBM3e): estimates, not measurements.
H200_MATMUL_MEASURED = 780e12
H200_COPY_MEASURED = 3.85e12
DATASHEET = {  # dense bf16 FLOP/s, HBM bytes/s
    "H200": (989e12, 4.8e12),
    "H100 SXM": (989e12, 3.35e12),
    "A100 80GB": (312e12, 2.039e12),
}
# Two constants the roofline cannot know, fitted (`--calibrate`: two equations, two unknowns) to the peer's two H200
# rows in MEASURED.md with this model's counts of the peer's step (the peer's code is the code that was measured;
# ours has changed since, so ours then is the out-of-sample check): the step's matmuls run at MATMUL_EFFICIENCY x the
# 8192^3 rate (smaller shapes, attention), and each launch costs LAUNCH_SECONDS beyond its bytes (host time, launch
# gaps, tails). Both are then used as they are for the H100 SXM and the A100.
MATMUL_EFFICIENCY = 0.7269  # fitted 2026-12-07 (code at main 59ac7b8; the peer's code as measured)
LAUNCH_SECONDS = 2.516e-6  # fitted likewise
# ../shared/gpu/MEASURED.md, H200, seq 512, one micro-batch per step, eager, tokens/s.
MEASURED_H200 = {("peer", 16): 60_508, ("peer", 32): 65_215, ("ours then", 16): 53_288, ("ours then", 32): 61_874}


def rates(gpu: str) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) of `gpu`: its datasheet scaled by the H200's measured efficiency."""
    flops, bandwidth = DATASHEET[gpu]
    return (flops * H200_MATMUL_MEASURED / DATASHEET["H200"][0], bandwidth * H200_COPY_MEASURED / DATASHEET["H200"][1])


# ---------------------------------------------------------------------------------------------------------------
# What the dispatch mode counts

aten = torch.ops.aten
# Views and metadata: no kernel, no bytes (func.is_view covers most; these are views in all but schema).
VIEW_OPS = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "as_strided", "slice", "select", "unbind",
            "split", "split_with_sizes", "chunk", "detach", "alias", "_reshape_alias", "unsqueeze", "squeeze",
            "reshape", "flatten", "unflatten", "narrow", "diagonal", "view_as", "expand_as", "lift_fresh",
            "_indices", "_values", "real", "imag", "view_as_real", "view_as_complex", "unfold", "movedim",
            "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim",
            "is_contiguous", "sym_is_contiguous", "storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
            "is_pinned", "record_stream", "set_", "resize_", "device", "layout", "detach_", "_version"}
# Allocation only: no kernel, no bytes.
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# Ops that write their mutated argument without reading it.
WRITE_ONLY_OPS = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                  "geometric_", "log_normal_", "cauchy_"}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
# CUDA multi-tensor apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh).
MTA_CHUNK = 65536
MTA_MAX_BLOCKS = 320
MTA_MAX_TENSORS = (110, 64, 48, 36, 30)


def _cpu_sdpa_flops():
    """FLOP formulas for the CPU's SDPA kernels (torch's registry has the CUDA ones), in the registry's convention."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    table = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return table


def flop_table() -> dict:
    from torch.utils.flop_counter import flop_registry

    return {**flop_registry, **_cpu_sdpa_flops()}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op touches in `t`: its elements, not counting broadcast (stride-0) dimensions."""
    if t.device.type == "meta" or t.layout != torch.strided:
        return 0
    numel = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            numel *= size
    return numel * t.element_size() if t.numel() else 0


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def mta_launches(numels: list[int], depth: int) -> int:
    """Kernels CUDA's multi_tensor_apply launches for tensors of these sizes with `depth` tensor lists."""
    max_tensors = MTA_MAX_TENSORS[min(max(depth, 1), 5) - 1]
    launches = tensors = blocks = 0
    numels = [n for n in numels if n > 0]
    for index, numel in enumerate(numels):
        tensors += 1
        chunks = -(-numel // MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_chunk = chunk == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == MTA_MAX_BLOCKS or (
                    index == len(numels) - 1 and last_chunk):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches


def _dense(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and (t.is_contiguous() or t.numel() <= 1)


def foreach_launches(name: str, args: tuple, kwargs: dict) -> tuple[int, str]:
    """Launches of a _foreach_* / _fused_adam* op on CUDA, and how they were estimated."""
    lists = [a for a in list(args) + list(kwargs.values())
             if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists:
        return 1, "no tensor list"
    main = lists[0]
    # Lists as long as the first and holding more than scalars are the kernel's depth (state_steps are not).
    data_lists = [lst for lst in lists if len(lst) == len(main) and any(t.numel() > 1 for t in lst)] or [main]
    depth = len(data_lists) + (0 if name.endswith("_") or name.startswith("_fused") or name == "_foreach_norm" else 1)
    tensors = [t for lst in data_lists for t in lst]
    if len({t.dtype for t in tensors}) > 1 or not all(_dense(t) for t in tensors):
        return len(main), "slow path: one per tensor"
    launches = mta_launches([t.numel() for t in main], depth)
    if name.startswith("_foreach_norm"):
        launches += 2  # at::zeros of the partial sums, and lpnorm_cleanup
    return launches, f"multi-tensor apply, depth {depth}"


@dataclass
class OpCost:
    calls: float = 0
    launches: float = 0
    flops: float = 0
    bytes_read: float = 0
    bytes_written: float = 0
    syncs: float = 0
    matmul: bool = False

    FIELDS = ("calls", "launches", "flops", "bytes_read", "bytes_written", "syncs")

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written


@dataclass
class Counts:
    """Per-op costs of what ran under one CostMode (or a linear combination of such)."""

    ops: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))
    notes: dict[str, str] = field(default_factory=dict)
    sync_sites: dict[str, float] = field(default_factory=dict)  # "file:line (function)" -> host syncs
    sites: dict[str, list] = field(default_factory=dict)  # "op at file:line (function)" -> [bytes, launches, matmul]

    def total(self, name: str, matmul: bool | None = None) -> float:
        return sum(getattr(op, name) if name != "bytes" else op.bytes
                   for op in self.ops.values() if matmul is None or op.matmul == matmul)

    def summary(self) -> dict[str, float]:
        return {"flops": self.total("flops"), "matmul_flops": self.total("flops", True),
                "memory_bound_bytes": self.total("bytes", False), "bytes": self.total("bytes"),
                "launches": self.total("launches"), "host_syncs": self.total("syncs"), "ops": self.total("calls")}

    @staticmethod
    def combine(terms: list[tuple[float, Counts]]) -> Counts:
        """sum of weight x counts, op by op and field by field."""
        out = Counts()
        for weight, counts in terms:
            for name, op in counts.ops.items():
                target = out.ops[name]
                target.matmul = target.matmul or op.matmul
                for f in OpCost.FIELDS:
                    setattr(target, f, getattr(target, f) + weight * getattr(op, f))
            out.notes.update(counts.notes)
            for site, value in counts.sync_sites.items():
                out.sync_sites[site] = out.sync_sites.get(site, 0) + weight * value
            for site, (nbytes, launches, matmul) in counts.sites.items():
                target = out.sites.setdefault(site, [0.0, 0.0, matmul])
                target[0] += weight * nbytes
                target[1] += weight * launches
        out.sync_sites = {site: value for site, value in out.sync_sites.items() if abs(value) > 1e-9}
        return out


def call_site() -> str:
    """Where an op comes from: the innermost caller outside torch and this file ("file:line (function)"); for an op
    that the autograd engine runs itself (no Python of ours or a library's in between), its node ("... (backward)")."""
    frame, ours = sys._getframe(1), None
    while frame is not None:
        path = frame.f_code.co_filename
        if path == __file__ and ours is None and frame.f_code.co_name == "run":  # the peer's loop, written here
            ours = f"benchmarks/step_cost.py:{frame.f_lineno} (the peer's loop)"
        if frame.f_code.co_name == "_engine_run_backward":
            node = torch._C._current_autograd_node()
            return f"{node.name() if node is not None else 'autograd'} (backward)"
        if not (path == __file__ or f"{os.sep}torch{os.sep}" in path or path.endswith("contextlib.py")):
            for marker in ("site-packages" + os.sep, REPO + os.sep):
                if marker in path:
                    path = path.split(marker, 1)[1]
            return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    node = torch._C._current_autograd_node()
    return f"{node.name()} (backward)" if node is not None else ours or "unknown"


def _short(func) -> str:
    """'aten.mm', 'lime.rms_norm_bwd', 'aten._foreach_add_': the op's name without its overload."""
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


class CostMode(TorchDispatchMode):
    """Counts FLOPs, bytes, launches and host syncs per op; ops with FLOPs skip their arithmetic (skip_flops)."""

    def __init__(self, skip_flops: bool = True, sites: bool = False):
        super().__init__()
        self.sites = sites  # also count bytes and launches per (op, call site)
        self.counts = Counts()
        self.skip_flops = skip_flops
        self.flops = flop_table()
        self.paused = False

    @contextlib.contextmanager
    def fused(self, name: str, launches: int, read: int, written: int, note: str):
        """Count what runs inside as one op `name` of these launches and bytes (a region a compiler fuses)."""
        op = self.counts.ops[name]
        op.calls += 1
        op.launches += launches
        op.bytes_read += read
        op.bytes_written += written
        self.counts.notes[name] = note
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _short(func)
        base = func._schema.name.split("::")[-1]
        if self.paused or base in VIEW_OPS or getattr(func, "is_view", False) or func.namespace == "prim":
            return func(*args, **kwargs)
        op = self.counts.ops[name]
        op.calls += 1
        if base in SYNC_OPS:
            op.syncs += 1
            site = call_site()
            self.counts.sync_sites[site] = self.counts.sync_sites.get(site, 0) + 1
        packet = func._overloadpacket
        formula = self.flops.get(packet)
        if formula is None and base.endswith("_") and func.namespace == "aten":  # addmm_, baddbmm_: in-place GEMMs
            formula = self.flops.get(getattr(aten, base[:-1], None))
        schema_args = func._schema.arguments
        mutated, out_args = [], []
        for index, arg in enumerate(schema_args):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = kwargs.get(arg.name) if arg.kwarg_only or index >= len(args) else args[index]
            (out_args if arg.kwarg_only else mutated).extend(
                t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
        if formula is not None and self.skip_flops:
            out = self._shape_only(func, args, kwargs, mutated, out_args)
        else:
            out = func(*args, **kwargs)
        if formula is not None:
            op.matmul = True
            try:
                op.flops += formula(*args, **kwargs, out_val=out)
            except TypeError:  # an overload with extra positional arguments (addmm.dtype_out's out_dtype): tensors only
                op.flops += formula(*[a for a in args if isinstance(a, torch.Tensor)], out_val=out)
        if base in ALLOC_OPS:
            return out
        out_names = {a.name for a in schema_args if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write}
        inputs = {_key(t) for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k not in out_names}))[0]
                  if isinstance(t, torch.Tensor)}
        written_only = {_key(t) for t in out_args} - inputs  # an out= tensor also passed as an input is read too
        if base in WRITE_ONLY_OPS and mutated:
            written_only.add(_key(mutated[0]))
        read = {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and _key(t) not in written_only:
                read.setdefault(_key(t), tensor_bytes(t))
        written = {}
        for t in mutated + out_args + [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]:
            written.setdefault(_key(t), tensor_bytes(t))
        op.bytes_read += sum(read.values())
        op.bytes_written += sum(written.values())
        launches = 0
        if base.startswith("_foreach_") or base.startswith("_fused_adam"):
            launches, how = foreach_launches(base, args, kwargs)
            self.counts.notes[name] = how
        elif base not in SYNC_OPS or base == "nonzero":
            launches = 1
        op.launches += launches
        if self.sites:
            site = self.counts.sites.setdefault(f"{name} at {call_site()}", [0.0, 0.0, op.matmul])
            site[0] += sum(read.values()) + sum(written.values())
            site[1] += launches
        return out

    @staticmethod
    def _shape_only(func, args, kwargs, mutated: list[torch.Tensor], out_args: list[torch.Tensor]):
        """The op's result without its arithmetic: in-place arguments as they were, out= arguments zeroed (they may be
        uninitialised memory), other results zeros shaped, typed and strided as the op makes them on meta."""
        for t in out_args:
            t.zero_()
        outputs = mutated + out_args
        if outputs:
            returns = func._schema.returns
            if len(returns) == 1:
                return outputs[0]
            return tuple(outputs[: len(returns)])

        def to_meta(t):
            if isinstance(t, torch.Tensor):
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            return t

        device = next(t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        meta = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))

        def to_zeros(t):
            if isinstance(t, torch.Tensor):
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).zero_()
            return t

        return tree_map(to_zeros, meta)


@contextlib.contextmanager
def counting(skip_flops: bool = True, sites: bool = False):
    """A CostMode; DeepSpeed's accelerator synchronize calls count as host syncs (op 'accelerator.synchronize')."""
    mode = CostMode(skip_flops, sites)
    accelerator, original = None, None
    try:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        original = accelerator.synchronize

        def synchronize(*args, **kwargs):
            op = mode.counts.ops["accelerator.synchronize"]
            op.calls += 1
            op.syncs += 1
            site = call_site()
            mode.counts.sync_sites[site] = mode.counts.sync_sites.get(site, 0) + 1
            return original(*args, **kwargs)

        accelerator.synchronize = synchronize
    except ImportError:
        pass
    global ACTIVE
    try:
        with mode:
            ACTIVE = mode
            yield mode.counts
    finally:
        ACTIVE = None
        if accelerator is not None:
            accelerator.synchronize = original


ACTIVE: CostMode | None = None  # the CostMode of `counting`, for the GPU paths below


@contextlib.contextmanager
def cuda_paths():
    """Where our model picks its path by device type, take the CUDA one, so the counts are those of a GPU step:

    - the chunked loss's body is torch.compile'd on CUDA, which Inductor makes one reduction (reading the logits)
      and one pointwise kernel (reading them again and writing their gradient in place): counted as those 2 launches
      and bytes (an estimate: Inductor's kernels are not run here), while the CPU's eager body computes the values;
    - GEMMs write fp32 themselves on CUDA (mm/addmm with out_dtype: the head's gradients, the linear layers' fp32
      weight-gradient accumulation; the CPU has no such GEMM, but
      GEMMs skip their arithmetic here, so the CUDA call is counted).
    Yields the list of what was switched (empty where this code has no such path)."""
    switched = []
    try:
        from megatron_lime.model import loss
    except ImportError:
        yield switched
        return
    try:
        from megatron_lime.model import linear as gemm_home  # where the fp32-output GEMM probe lives (since 081fc34)
    except ImportError:
        gemm_home = loss
    if not isinstance(getattr(gemm_home, "_FP32_OUT_GEMM", None), dict):
        gemm_home = loss
    saved_bodies = dict(getattr(loss, "_BODIES", {}))
    saved_gemm = dict(getattr(gemm_home, "_FP32_OUT_GEMM", {}))
    eager = getattr(loss, "chunk_loss_and_logit_grad_in_place_", None)
    if isinstance(getattr(loss, "_BODIES", None), dict) and eager is not None:
        def body(logits, labels, token_weights):
            if ACTIVE is None:
                return eager(logits, labels, token_weights)
            read = 2 * tensor_bytes(logits) + tensor_bytes(labels) + tensor_bytes(token_weights)
            with ACTIVE.fused("inductor.chunk_loss_body", 2, read, tensor_bytes(logits) + 4,
                              "torch.compile'd on CUDA: 1 reduction + 1 pointwise kernel (estimated)"):
                return eager(logits, labels, token_weights)

        loss._BODIES["cpu"] = body
        switched.append("loss body: as torch.compile'd on CUDA (2 kernels)")
    if isinstance(getattr(gemm_home, "_FP32_OUT_GEMM", None), dict):
        gemm_home._FP32_OUT_GEMM["cpu"] = True
        switched.append("fp32-output GEMMs (mm/addmm out_dtype)")
    try:
        yield switched
    finally:
        if isinstance(getattr(loss, "_BODIES", None), dict):
            loss._BODIES.clear()
            loss._BODIES.update(saved_bodies)
        if isinstance(getattr(gemm_home, "_FP32_OUT_GEMM", None), dict):
            gemm_home._FP32_OUT_GEMM.clear()
            gemm_home._FP32_OUT_GEMM.update(saved_gemm)


# ---------------------------------------------------------------------------------------------------------------
# The two steps


def git_commit() -> str:
    """The commit of the megatron_lime that is imported (a worktree of an older commit on PYTHONPATH counts that)."""
    import megatron_lime

    try:
        return subprocess.run(["git", "-C", os.path.dirname(megatron_lime.__file__), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def our_precision_flags(precision: str) -> list[str]:
    """Our flags for a precision; --precision where this code has it (else --bf16 for bf16, nothing for autocast)."""
    from megatron_lime.training.config import build_parser

    has_precision = any("--precision" in action.option_strings for action in build_parser()._actions)
    if has_precision:
        return ["--precision", precision]
    if precision == "bf16":
        return ["--bf16"]
    raise NotImplementedError("--precision autocast is not in this code's flags")


class OurStep:
    """train_step on the engine wrap_model builds (the recipe's DeepSpeed config), L layers, micro-batch b."""

    def __init__(self, model: str, layers: int, seq: int, micro: int, precision: str, ds_config: str):
        from megatron_lime.training import wrap
        from megatron_lime.training.config import parse_training_args
        from megatron_lime.training.pretrain import build_model, train_step

        self.train_step = train_step
        flags = ["--model", model, "--num-layers", str(layers), "--seq-length", str(seq), "--micro-batch-size",
                 str(micro), "--global-batch-size", str(micro), "--train-iters", "100", "--lr", "1e-4",
                 "--min-lr", "1e-5", "--lr-warmup-iters", "0", *our_precision_flags(precision)]
        if ds_config.lower() != "none":
            flags += ["--deepspeed-config", ds_config]
        self.args = parse_training_args(flags)
        self.device = torch.device("cpu")
        self.micro = micro
        original = wrap.build_optimizer
        # The optimizer wrap_model builds on a GPU (fused AdamW), not the CPU's plain one.
        wrap.build_optimizer = lambda model, args, device: original(model, args, torch.device("cuda"))
        try:
            model_ = build_model(self.args.model, self.args.training.seed, self.device)
            self.engine, _ = wrap.wrap_model(model_, self.args, self.device, 1)
        finally:
            wrap.build_optimizer = original
        self.engine.train()

    def run(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.engine.set_train_batch_size(self.micro * len(batches))  # accumulation = len(batches)
        assert self.engine.micro_steps % len(batches) == 0, "a step must start at an accumulation boundary"
        self.train_step(self.engine, batches, self.args.optimizer.lr, self.device)
        if not self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed skipped the optimizer step (overflow): the counts would miss it")

    def close(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        del self.engine


class PeerStep:
    """bench_gpu_peer.py's build_peer and its loop (copied line for line; AdamW fused as on its GPU)."""

    def __init__(self, model: str, layers: int, seq: int, micro: int, precision: str, ds_config: str):
        from bench_gpu_peer import build_peer
        from megatron_lime.config import LimeConfig

        self.model = build_peer(LimeConfig.from_name(model, num_layers=layers), seq, torch.device("cpu"))
        self.model.train()
        self.parameters = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4, fused=True)

    def run(self, batches: list[dict[str, torch.Tensor]]) -> None:
        inputs = [batch["input_ids"] for batch in batches]
        for input_ids in inputs:  # the plain loop of bench_gpu_peer.run_mode
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = self.model(input_ids=input_ids, labels=input_ids).loss / len(inputs)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.detach() * len(inputs)

    def close(self) -> None:
        del self.model, self.optimizer


STEPS = {"ours": OurStep, "peer": PeerStep}


def random_batches(vocab: int, micro: int, seq: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (micro, seq + 1), generator=generator)
        out.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(micro, seq)})
    return out


def measure(who: str, model: str, layers: int, seq: int, micros: tuple[int, ...], precision: str,
            options: argparse.Namespace) -> dict[tuple[int, int], Counts]:
    """Counts of one step at (micro-batch b, accumulation acc) for every b in micros and acc in {1, 2}."""
    from bench_common import Stopwatch  # imports the library: in here, as this file's other library imports
    from megatron_lime.config import LimeConfig

    vocab = LimeConfig.from_name(model).vocab_size
    with Stopwatch() as watch:
        step = STEPS[who](model, layers, seq, micros[0], precision, options.ds_config)
        results = {}
        paths = cuda_paths() if who == "ours" and not options.cpu_paths else contextlib.nullcontext([])
        with paths as switched:
            measure_steps(step, vocab, seq, micros, results)
        step.close()
        del step
        gc.collect()
    print(f"  {who:<4} {precision:<8} L={layers} b={','.join(map(str, micros))}: "
          f"{watch.seconds:.1f} s" + (f"; CUDA paths: {', '.join(switched)}" if switched else ""), flush=True)
    return results


def measure_steps(step, vocab: int, seq: int, micros: tuple[int, ...], results: dict) -> None:
    with counting():  # warm-up: optimizer state, first-step allocations (counted, then thrown away)
        step.run(random_batches(vocab, micros[0], seq, 2))
    # Two micro-batches first: DeepSpeed finds the accumulation boundary by its micro-step count modulo the
    # accumulation, so every step must start at a multiple of it.
    for acc in (2, 1):
        for micro in micros:
            with counting(sites=True) as counts:
                step.run(random_batches(vocab, micro, seq, acc))
            results[micro, acc] = counts


def bilinear(points: dict[tuple[int, int], Counts], layers: float, micro: float) -> Counts:
    """Counts at (layers, micro) from four runs at (L1, b1), (L2, b1), (L1, b2), (L2, b2), bilinear in (L, b)."""
    (l1, l2), (b1, b2) = sorted({k[0] for k in points}), sorted({k[1] for k in points})
    x, y = (layers - l1) / (l2 - l1), (micro - b1) / (b2 - b1)
    return Counts.combine([((1 - x) * (1 - y), points[l1, b1]), (x * (1 - y), points[l2, b1]),
                           ((1 - x) * y, points[l1, b2]), (x * y, points[l2, b2])])


@dataclass
class Model:
    """cost(L, b, acc) = A(L, b) + (acc - 1) D(L, b) from the runs at L in {l1, l2}, b in {b1, b2}, acc in {1, 2}."""

    one: dict[tuple[int, int], Counts]  # (L, b) -> a step of one micro-batch
    more: dict[tuple[int, int], Counts]  # (L, b) -> each further micro-batch

    @staticmethod
    def from_runs(runs: dict[int, dict[tuple[int, int], Counts]]) -> Model:
        one, more = {}, {}
        for layers, by_shape in runs.items():
            for (micro, acc), counts in by_shape.items():
                if acc == 1:
                    one[layers, micro] = counts
                    more[layers, micro] = Counts.combine([(1.0, by_shape[micro, 2]), (-1.0, counts)])
        return Model(one, more)

    def predict(self, layers: int, micro: int, acc: int) -> Counts:
        return Counts.combine([(1.0, bilinear(self.one, layers, micro)),
                               (acc - 1.0, bilinear(self.more, layers, micro))])


def check_extrapolation(model: Model, measured: dict[tuple[int, int], Counts], layers: int) -> dict[str, float]:
    """Per total (FLOPs, bytes, launches, ...), the largest relative error of the model against a run at `layers`."""
    worst: dict[str, float] = defaultdict(float)
    for (micro, acc), counts in measured.items():
        predicted = model.predict(layers, micro, acc).summary()
        for key, value in counts.summary().items():
            error = abs(predicted[key] - value) / abs(value) if value else (math.inf if abs(predicted[key]) > 1e-6
                                                                             else 0.0)
            worst[key] = max(worst[key], error)
    return dict(worst)


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def per_token(counts: Counts, tokens: int) -> dict[str, float]:
    s = counts.summary()
    return {"flops_per_token": s["flops"] / tokens, "matmul_flops_per_token": s["matmul_flops"] / tokens,
            "memory_bytes_per_token": s["memory_bound_bytes"] / tokens, "bytes_per_token": s["bytes"] / tokens,
            "launches_per_token": s["launches"] / tokens, "host_syncs_per_step": s["host_syncs"]}


@dataclass
class Roofline:
    """seconds = matmul FLOPs / (efficiency x matmul rate) + memory-bound bytes / bandwidth + launches x seconds."""

    matmul_efficiency: float = MATMUL_EFFICIENCY
    launch_seconds: float = LAUNCH_SECONDS

    def seconds(self, counts: Counts, gpu: str) -> float:
        matmul_rate, bandwidth = rates(gpu)
        s = counts.summary()
        return (s["matmul_flops"] / (self.matmul_efficiency * matmul_rate) + s["memory_bound_bytes"] / bandwidth
                + s["launches"] * self.launch_seconds)

    @staticmethod
    def fit(peer: Model, seq: int, layers: int) -> Roofline:
        """The efficiency and per-launch seconds that reproduce the peer's two H200 rows exactly."""
        matmul_rate, bandwidth = rates("H200")
        rows = []
        for (who, micro), measured in MEASURED_H200.items():
            if who == "peer":
                s = peer.predict(layers, micro, 1).summary()
                rows.append((s["matmul_flops"] / matmul_rate, s["launches"],
                             micro * seq / measured - s["memory_bound_bytes"] / bandwidth))
        (a1, n1, t1), (a2, n2, t2) = rows  # t = a / efficiency + n x launch
        det = a1 * n2 - a2 * n1
        inverse_efficiency, launch = (t1 * n2 - t2 * n1) / det, (a1 * t2 - a2 * t1) / det
        return Roofline(1 / inverse_efficiency, launch)


def top_ops(counts: Counts, key: str, n: int) -> list[tuple[str, float]]:
    values = [(name, op.bytes if key == "bytes" else getattr(op, key)) for name, op in counts.ops.items()
              if not (key == "bytes" and op.matmul)]
    return sorted((v for v in values if v[1] > 0.5), key=lambda v: -v[1])[:n]


def fmt(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def report(precision: str, shape: tuple[int, int], seq: int, ours: Counts | None, peer: Counts | None, top: int,
           roofline: Roofline) -> dict:
    micro, acc = shape
    tokens = micro * acc * seq
    rows = [("ours", ours), ("peer", peer)]
    figures = {}
    for who, counts in rows:
        if counts is None:
            continue
        figure = per_token(counts, tokens)
        for gpu in ("H100 SXM", "A100 80GB"):
            figure[f"projected_{gpu.split()[0].lower()}_tokens_per_s"] = tokens / roofline.seconds(counts, gpu)
        figures[who] = figure
    print(f"\n== precision {precision}: micro-batch {micro} x {acc} accumulation = {micro * acc} sequences of {seq} "
          f"per GPU per step ({tokens:,} tokens) ==")
    names = [("flops_per_token", "FLOPs / token"), ("matmul_flops_per_token", "matmul FLOPs / token"),
             ("memory_bytes_per_token", "memory-bound bytes / token"), ("bytes_per_token", "total bytes / token"),
             ("launches_per_token", "launches / token"), ("host_syncs_per_step", "host syncs / step"),
             ("projected_h100_tokens_per_s", "projected H100 SXM tokens/s"),
             ("projected_a100_tokens_per_s", "projected A100 80GB tokens/s")]
    print(f"  {'':<30} {'ours':>12} {'peer':>12} {'ours / peer':>12}")
    for key, label in names:
        o, p = figures.get("ours", {}).get(key), figures.get("peer", {}).get(key)
        ratio = f"{o / p:.3f}" if o is not None and p else "-"
        print(f"  {label:<30} {fmt(o) if o is not None else 'n/a':>12} {fmt(p) if p is not None else 'n/a':>12} "
              f"{ratio:>12}")
    for who, counts in rows:
        if counts is None:
            continue
        launches = counts.total("launches")
        for key, label, total in (("bytes", "memory-bound bytes", counts.total("bytes", False)),
                                  ("launches", "launches", launches)):
            print(f"  {who}: top ops by {label} per token (share of the step's {label})")
            for name, value in top_ops(counts, key, top):
                how = f"  [{counts.notes[name]}]" if key == "launches" and name in counts.notes else ""
                print(f"      {name:<48} {fmt(value / tokens):>9}  {100 * value / total:5.1f}%{how}")
        for index, label in ((0, "memory-bound bytes"), (1, "launches")):
            print(f"  {who}: top call sites by {label} per token (op at the innermost frame outside torch)")
            ranked = sorted(((site, v[index]) for site, v in counts.sites.items() if not (index == 0 and v[2])),
                            key=lambda item: -item[1])[:top]
            for site, value in ranked:
                print(f"      {fmt(value / tokens):>9}  {site}")
        syncs = [(name, op.syncs) for name, op in counts.ops.items() if op.syncs]
        print(f"  {who}: host syncs per step: " + (", ".join(f"{name} {v:g}" for name, v in syncs) or "none")
              + "".join(f"\n      {v:g} at {site}" for site, v in sorted(counts.sync_sites.items())))
    for who, counts in rows:
        if counts is not None:
            figures[who]["top_memory_bytes_per_token"] = {k: v / tokens for k, v in top_ops(counts, "bytes", top)}
            figures[who]["top_launches_per_token"] = {k: v / tokens for k, v in top_ops(counts, "launches", top)}
            figures[who]["host_sync_sites_per_step"] = dict(sorted(counts.sync_sites.items()))
            figures[who]["sites_per_token"] = {
                site: {"bytes": v[0] / tokens, "launches": v[1] / tokens, "matmul": v[2]}
                for site, v in sorted(counts.sites.items(), key=lambda item: -item[1][0]) if abs(v[0]) + abs(v[1])}
            figures[who]["ops_per_token"] = {
                name: {"launches": op.launches / tokens, "bytes": op.bytes / tokens, "flops": op.flops / tokens,
                       "matmul": op.matmul, "calls_per_step": op.calls}
                for name, op in sorted(counts.ops.items())}
    return figures


def calibration(models: dict[str, Model], seq: int, layers: int, roofline: Roofline, commit: str,
                precision: str) -> dict[str, Any]:
    """Projected H200 tokens/s against MEASURED.md's rows (one micro-batch per step, eager)."""
    out: dict[str, Any] = {"matmul_efficiency": roofline.matmul_efficiency, "launch_seconds": roofline.launch_seconds,
                           "rows": {}}
    for (who, micro), measured in MEASURED_H200.items():
        model = models.get("peer" if who == "peer" else "ours")
        if model is None or (who != "peer" and precision != "bf16"):  # ours then ran DeepSpeed's bf16 mode
            continue
        projected = micro * seq / roofline.seconds(model.predict(layers, micro, 1), "H200")
        name = f"peer mb{micro}" if who == "peer" else f"ours at {commit} mb{micro} vs ours then"
        out["rows"][name] = {"measured": measured, "projected": projected, "error": projected / measured - 1}
    return out


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-1b", help="the preset whose dims are counted (default lime-1b)")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--layers", type=int, default=None, help="layers to extrapolate to (default: the preset's)")
    parser.add_argument("--shapes", nargs="+", default=[f"{m}x{a}" for m, a in RECIPE_SHAPES],
                        help="MICROxACCUMULATION per GPU per step to report (default: the recipe at 8 GPUs, 16x4 32x2)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="bf16: DeepSpeed's bf16 mode (bf16 weights, fp32 master); autocast: --precision "
                             "autocast (fp32 weights, bf16 compute). The peer has one mode (fp32 weights + autocast), "
                             "reported under both")
    parser.add_argument("--ds-config", default=DS_CONFIG,
                        help="our --deepspeed-config (default: the recipe's; 'none': only what wrap_model sets, as "
                             "bench_gpu_train.py ran on 2026-12-04)")
    parser.add_argument("--check-layers", type=int, default=3,
                        help="also run this many layers and compare with the extrapolation (0: skip)")
    parser.add_argument("--top", type=int, default=8, help="ops per breakdown")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--calibrate", action="store_true",
                        help="also fit the per-launch seconds to the peer's H200 rows and print it")
    parser.add_argument("--quick", action="store_true",
                        help="lime-tiny's dims at seq 64, shape 32x2: seconds, for the test")
    parser.add_argument("--only", choices=list(STEPS), default=None, help="count only ours or only the peer")
    parser.add_argument("--cpu-paths", action="store_true",
                        help="count our step's CPU paths where the model picks by device (default: the CUDA ones, "
                             "see cuda_paths)")
    options = parser.parse_args(argv)
    if options.quick:
        options.model, options.seq_length = "lime-tiny", 64
        if options.shapes == parser.get_default("shapes"):
            options.shapes = ["32x2"]  # two of lime-tiny's loss chunks (1,024 tokens) per micro-batch at seq 64
    try:
        options.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in options.shapes]
        assert all(len(s) == 2 and min(s) > 0 for s in options.shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes takes MICROxACCUMULATION, e.g. 16x4; got {options.shapes}")
    return options


def setup_process_group() -> None:
    """One process, gloo, DeepSpeed's CPU accelerator (as tests/helpers.py and bench_train.py)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron_lime.training.distributed import init_distributed

    init_distributed()


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    setup_process_group()
    from megatron_lime.config import LimeConfig

    config = LimeConfig.from_name(options.model)
    layers = options.layers or config.num_layers
    seq = options.seq_length
    unit = max(1, config.loss_chunk_size // seq) if config.loss_chunk_size else 1  # one loss chunk per unit
    micros = (unit, 2 * unit)
    commit = git_commit()
    print(f"step_cost: {options.model} dims (d {config.hidden_size}, {config.num_attention_heads} heads, ffn "
          f"{config.ffn_hidden_size}, vocab {config.vocab_size}), seq {seq}, extrapolated to {layers} layers from "
          f"runs at 1 and 2 layers, micro-batches {micros[0]} and {micros[1]}, 1 and 2 per step; code at {commit}; "
          f"torch {torch.__version__}", flush=True)
    whos = [options.only] if options.only else list(STEPS)
    ds_config_name = "none" if options.ds_config.lower() == "none" else os.path.relpath(options.ds_config, REPO)
    results: dict[str, Any] = {"model": options.model, "seq_length": seq, "layers": layers, "commit": commit,
                               "torch": torch.__version__, "ds_config": ds_config_name,
                               "precisions": {}, "extrapolation_check": {}}
    models: dict[str, dict[str, Model]] = defaultdict(dict)
    peer_model = None
    for precision in options.precisions:
        for who in whos:
            if who == "peer" and peer_model is not None:  # one mode: the same counts under both precisions
                models[precision]["peer"] = peer_model
                continue
            try:
                runs = {n: measure(who, options.model, n, seq, micros, precision, options) for n in (1, 2)}
            except NotImplementedError as error:
                print(f"  {who} {precision}: not counted ({error})", flush=True)
                continue
            model = Model.from_runs(runs)
            if options.check_layers:
                check = measure(who, options.model, options.check_layers, seq, micros, precision, options)
                error = check_extrapolation(model, check, options.check_layers)
                results["extrapolation_check"][f"{who} {precision}"] = error
                print(f"  {who} {precision}: {options.check_layers} layers predicted from 1 and 2, largest relative "
                      f"error: " + ", ".join(f"{k} {v:.1e}" for k, v in error.items()), flush=True)
            models[precision][who] = model
            if who == "peer":
                peer_model = model
    calibrated = options.model == "lime-1b" and seq == 512 and layers == 32
    roofline = Roofline()
    if options.calibrate and calibrated and peer_model is not None:
        roofline = Roofline.fit(peer_model, seq, layers)
        print(f"  fitted to the peer's H200 rows: MATMUL_EFFICIENCY = {roofline.matmul_efficiency:.4f}, "
              f"LAUNCH_SECONDS = {roofline.launch_seconds:.3e} (used for every projection below)", flush=True)
    results["roofline"] = {"matmul_efficiency": roofline.matmul_efficiency,
                           "launch_seconds": roofline.launch_seconds,
                           "rates": {gpu: dict(zip(("matmul_flops_per_s", "copy_bytes_per_s"), rates(gpu)))
                                     for gpu in DATASHEET}}
    for precision in options.precisions:
        if not models[precision]:
            continue
        entry = results["precisions"][precision] = {}
        for micro, acc in options.shapes:
            predicted = {who: m.predict(layers, micro, acc) for who, m in models[precision].items()}
            entry[f"{micro}x{acc}"] = report(precision, (micro, acc), seq, predicted.get("ours"), predicted.get("peer"),
                                             options.top, roofline)
        # The first shape's figures at the top level, for comparisons between runs.
        first = entry[f"{options.shapes[0][0]}x{options.shapes[0][1]}"]
        for who in ("ours", "peer"):
            if who in first:
                entry[who] = {k: first[who][k] for k in ("memory_bytes_per_token", "launches_per_token",
                                                         "host_syncs_per_step", "projected_h100_tokens_per_s",
                                                         "projected_a100_tokens_per_s", "flops_per_token",
                                                         "matmul_flops_per_token", "bytes_per_token")}
        if calibrated:
            cal = calibration(models[precision], seq, layers, roofline, commit, precision)
            entry["calibration_h200"] = cal
            print(f"  calibration against MEASURED.md (H200, one micro-batch per step, eager; matmuls at "
                  f"{roofline.matmul_efficiency:.3f} x {H200_MATMUL_MEASURED / 1e12:.0f} TFLOP/s, "
                  f"{roofline.launch_seconds * 1e6:.2f} us per launch):")
            for row, values in cal["rows"].items():
                print(f"      {row:<34} measured {values['measured']:>7,} tok/s  projected "
                      f"{values['projected']:>7,.0f}  error {100 * values['error']:+.1f}%")
    if options.json:
        from megatron_lime.files import write_json

        write_json(options.json, results)
        print(f"wrote {options.json}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
