"""Time the fused RMSNorm (and optionally SiLU) against eager PyTorch, F.rms_norm, torch.compile and apex.

    python benchmarks/bench_kernels.py                        # [8192, 1536], fp32 and bf16, on CUDA if present
    python benchmarks/bench_kernels.py --device cuda --ops rms_norm silu --json kernels.json
    python benchmarks/bench_kernels.py --device cpu --ops rms_norm silu
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_kernels.py --device cpu   # torch's huge-page allocations

[8192, 1536] is one LIME-1B micro-batch (16 x 512 tokens, d_model 1536); SiLU runs on the MLP's
[8192, 6144]. For each dtype it prints, per implementation, the median milliseconds of the
forward, the backward and forward+backward, the effective bandwidth (bytes the op must move /
time: forward reads x and writes y; backward reads dy and x and writes dx), and that bandwidth
as a fraction of a device-to-device copy of x measured in the same run (the floor of any
one-pass op on the same data, in or out of cache alike). All implementations run in the same
process on the same inputs, timed round-robin so that load from other processes falls on all
of them alike; on CUDA with events around back-to-back calls.

On CPU a fresh 50 MB output is page-faulted in as it is first written, which costs about as much
as the arithmetic; the "allocation" table times our kernels writing into fresh outputs and into
preallocated ones, so the difference is the allocation. (The CUDA caching allocator reuses
memory, so on GPUs there is nothing to separate.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_lime import kernels
from megatron_lime.files import write_json
from megatron_lime.kernels import _backend

EPS = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Timing:
    name: str
    forward_ms: float
    backward_ms: float
    forward_backward_ms: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                          iterations: int) -> dict[str, float]:
    """Median time in ms of one call of each fn, timed round-robin so that load from other
    processes on a shared machine falls on every implementation alike.

    CPU: wall time of each call. CUDA: CUDA events around `iterations` back-to-back calls (a
    host clock and a sync per call would add the launch latency to kernels that take
    microseconds), in 5 rounds; the median of the rounds' per-call times.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    if device.type == "cuda":
        for _ in range(5):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iterations):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / iterations)
        return {name: statistics.median(times) for name, times in samples.items()}
    for _ in range(iterations):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def phase_calls(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                grad_out: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """Forward alone (no autograd), backward alone (of one retained graph) and forward+backward
    (gradients of every input) of fn(*inputs)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    detached = [t.detach() for t in inputs]
    retained = fn(*leaves)

    def forward() -> None:
        with torch.no_grad():
            fn(*detached)

    def backward() -> None:
        for leaf in leaves:
            leaf.grad = None  # a fresh gradient each time, as in training (no accumulation pass)
        retained.backward(grad_out, retain_graph=True)

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad_out)

    return forward, backward, forward_backward


def time_implementations(impls: dict[str, Callable[..., torch.Tensor]], inputs: list[torch.Tensor],
                         grad_out: torch.Tensor, device: torch.device, warmup: int, iterations: int) -> list[Timing]:
    calls = {}
    for name, fn in impls.items():
        start = time.perf_counter()
        calls[name] = phase_calls(fn, inputs, grad_out)
        for call in calls[name]:
            call()
        if "compile" in name:
            tqdm.write(f"  ({name}: first calls, compilation included, took {time.perf_counter() - start:.0f} s)",
                       file=sys.stderr)
    phases = [interleaved_median_ms({name: c[i] for name, c in calls.items()}, device, warmup, iterations)
              for i in range(3)]
    return [Timing(name, phases[0][name], phases[1][name], phases[2][name]) for name in impls]


def copy_ms(like: torch.Tensor, device: torch.device, warmup: int, iterations: int) -> float:
    """One device-to-device copy of a tensor like `like` (read + write: the floor of a one-pass op)."""
    source, destination = torch.randn_like(like), torch.empty_like(like)
    return interleaved_median_ms({"copy": lambda: destination.copy_(source)}, device, warmup, iterations)["copy"]


def implementations(op: str, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    if op == "rms_norm":
        found: dict[str, Callable[..., torch.Tensor]] = {
            f"ours ({kernels.backend(device)})": lambda x, w: kernels.rms_norm(x, w, EPS),
            "eager reference": lambda x, w: kernels.rms_norm_ref(x, w, EPS),
            "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
            "torch.compile(reference)": torch.compile(lambda x, w: kernels.rms_norm_ref(x, w, EPS)),
        }
        if device.type == "cuda":
            apex = _backend._load_apex_rms_norm().module
            if apex is not None:
                found["apex FusedRMSNorm"] = lambda x, w: apex.fused_rms_norm_affine(x, w, w.shape, EPS)
        return found
    return {
        f"ours ({kernels.backend(device)})": kernels.silu,
        "eager reference": kernels.silu_ref,
        "F.silu": F.silu,
        "torch.compile(reference)": torch.compile(kernels.silu_ref),
    }


def make_inputs(op: str, rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    if op == "rms_norm":
        return [x, (1 + 0.1 * torch.randn(hidden, generator=g)).to(device=device, dtype=dtype)]
    return [x]


# Bytes each phase must move, in tensors of x's size: forward reads x and writes y; backward
# reads dy and x and writes dx (the weight and rstd are a row each); forward+backward both.
PHASE_TENSORS = {"forward": 2, "backward": 3, "forward+backward": 5}


def table_rows(timings: list[Timing], numel: int, itemsize: int, copy: float) -> list[dict[str, float | str]]:
    """Per implementation and phase: ms, GB/s and the fraction of a copy's bandwidth."""
    copy_gbps = 2 * numel * itemsize / copy / 1e6
    rows = []
    for t in timings:
        row: dict[str, float | str] = {"implementation": t.name}
        for phase, ms in zip(PHASE_TENSORS, (t.forward_ms, t.backward_ms, t.forward_backward_ms)):
            gbps = PHASE_TENSORS[phase] * numel * itemsize / ms / 1e6
            row.update({f"{phase} ms": ms, f"{phase} GB/s": gbps, f"{phase} of copy": gbps / copy_gbps})
        rows.append(row)
    return rows


def print_table(op: str, dtype_name: str, shape: tuple[int, int], rows: list[dict], copy: float,
                copy_gbps: float) -> None:
    print(f"\n{op} {list(shape)} {dtype_name}: a copy of x moves {copy_gbps:.0f} GB/s ({copy * 1e3:.1f} us); "
          f"each phase as ms, GB/s and fraction of that copy")
    header = "".join(f" {phase + ' ms':>17} {'GB/s':>7} {'copy':>5}" for phase in PHASE_TENSORS)
    print(f"{'implementation':<28}{header}")
    for row in rows:
        cells = "".join(f" {row[f'{phase} ms']:17.3f} {row[f'{phase} GB/s']:7.0f} {row[f'{phase} of copy']:5.2f}"
                        for phase in PHASE_TENSORS)
        print(f"{row['implementation']:<28}{cells}")


def allocation_table(op: str, inputs: list[torch.Tensor], dtype_name: str, warmup: int, iterations: int) -> None:
    """CPU only: our kernels into fresh outputs vs into preallocated ones."""
    ext = _backend.SELECTION.cpu_extension
    if ext is None:
        return
    device = torch.device("cpu")
    x = inputs[0]
    dy = torch.randn_like(x)
    if op == "rms_norm":
        w = inputs[1]
        y, rstd = ext.rms_norm_fwd(x, w, EPS)
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        fresh_fwd = lambda: ext.rms_norm_fwd(x, w, EPS)  # noqa: E731
        reused_fwd = lambda: ext.rms_norm_fwd_out(x, w, EPS, y, rstd)  # noqa: E731
        fresh_bwd = lambda: ext.rms_norm_bwd(dy, x, w, rstd)  # noqa: E731
        reused_bwd = lambda: ext.rms_norm_bwd_out(dy, x, w, rstd, dx, dw)  # noqa: E731
    else:
        y, dx = torch.empty_like(x), torch.empty_like(x)
        fresh_fwd = lambda: ext.silu_fwd(x)  # noqa: E731
        reused_fwd = lambda: ext.silu_fwd_out(x, y)  # noqa: E731
        fresh_bwd = lambda: ext.silu_bwd(dy, x)  # noqa: E731
        reused_bwd = lambda: ext.silu_bwd_out(dy, x, dx)  # noqa: E731
    rows = []
    for name, fresh, reused in (("forward", fresh_fwd, reused_fwd), ("backward", fresh_bwd, reused_bwd)):
        ms = interleaved_median_ms({"fresh": fresh, "reused": reused}, device, warmup, iterations)
        rows.append((name, ms["fresh"], ms["reused"]))
    mb = x.numel() * x.element_size() / 1e6
    print(f"  allocation ({op} {dtype_name}, one {mb:.0f} MB output per kernel; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}):")
    for name, fresh_ms, reused_ms in rows:
        print(f"    ours {name:<9} fresh output {fresh_ms:7.2f} ms, preallocated {reused_ms:7.2f} ms: "
              f"allocation {fresh_ms - reused_ms:6.2f} ms ({100 * (fresh_ms - reused_ms) / fresh_ms:3.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=("rms_norm", "silu"), default=["rms_norm"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--rows", type=int, default=16 * 512, help="tokens: micro-batch x sequence length")
    parser.add_argument("--hidden", type=int, default=1536, help="RMSNorm width (SiLU uses 4x: the MLP)")
    parser.add_argument("--iterations", type=int, default=None, help="timed calls (default: 20 CPU, 100 CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    iterations = args.iterations or (100 if device.type == "cuda" else 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; kernels: {kernels.backend(device)}; "
          f"median of {iterations} calls after {args.warmup} warm-up")

    results = {"device": name, "torch": torch.__version__, "kernels": kernels.backend(device),
               "rows": args.rows, "hidden": args.hidden, "tables": {}}
    jobs = [(op, dtype_name) for op in args.ops for dtype_name in args.dtypes]
    for op, dtype_name in tqdm(jobs, desc="benchmarks", file=sys.stderr):
        dtype = DTYPES[dtype_name]
        hidden = args.hidden if op == "rms_norm" else 4 * args.hidden
        inputs = make_inputs(op, args.rows, hidden, dtype, device)
        grad_out = torch.randn_like(inputs[0])
        timings = time_implementations(implementations(op, device), inputs, grad_out, device, args.warmup,
                                       iterations)
        numel, itemsize = args.rows * hidden, inputs[0].element_size()
        copy = copy_ms(inputs[0], device, args.warmup, iterations)
        rows = table_rows(timings, numel, itemsize, copy)
        copy_gbps = 2 * numel * itemsize / copy / 1e6
        print_table(op, dtype_name, (args.rows, hidden), rows, copy, copy_gbps)
        results["tables"][f"{op} {dtype_name}"] = {"shape": [args.rows, hidden], "copy_ms": copy,
                                                   "copy_GB/s": copy_gbps, "implementations": rows}
        if args.json:
            write_json(args.json, results)
        if device.type == "cpu":
            allocation_table(op, inputs, dtype_name, args.warmup, iterations)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
