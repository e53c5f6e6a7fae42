"""Time the fused RMSNorm (and optionally SiLU) against eager PyTorch, F.rms_norm and torch.compile.

    python benchmarks/bench_kernels.py                        # [8192, 1536], fp32 and bf16, on CUDA if present
    python benchmarks/bench_kernels.py --device cpu --ops rms_norm silu
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_kernels.py --device cpu   # torch's huge-page allocations

[8192, 1536] is one LIME-1B micro-batch (16 x 512 tokens, d_model 1536); SiLU runs on the MLP's
[8192, 6144]. For each dtype it prints, per implementation, the median milliseconds of the
forward and of forward+backward, the effective bandwidth (bytes the op must move / time:
forward reads x and writes y; backward reads dy and x and writes dx), and each one's time
relative to ours (x slower). All implementations run in the same process on the same inputs,
timed round-robin so that load from other processes falls on all of them alike.

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
from megatron_lime.kernels import _backend

EPS = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Timing:
    name: str
    forward_ms: float
    forward_backward_ms: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                          iterations: int) -> dict[str, float]:
    """Median wall time in ms of each fn, timed round-robin (one call of each per round), so load
    from other processes on a shared machine falls on every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iterations):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def forward_and_backward_calls(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                               grad_out: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward alone (no autograd) and forward+backward (gradients of every input) of fn(*inputs)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    detached = [t.detach() for t in inputs]

    def forward() -> None:
        with torch.no_grad():
            fn(*detached)

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None  # a fresh gradient each time, as in training (no accumulation pass)
        fn(*leaves).backward(grad_out)

    return forward, forward_backward


def time_implementations(impls: dict[str, Callable[..., torch.Tensor]], inputs: list[torch.Tensor],
                         grad_out: torch.Tensor, device: torch.device, warmup: int, iterations: int) -> list[Timing]:
    calls = {name: forward_and_backward_calls(fn, inputs, grad_out) for name, fn in impls.items()}
    for name, (forward, forward_backward) in calls.items():
        start = time.perf_counter()
        forward()
        forward_backward()
        if "compile" in name:
            tqdm.write(f"  ({name}: first calls, compilation included, took {time.perf_counter() - start:.0f} s)",
                       file=sys.stderr)
    forward_ms = interleaved_median_ms({name: c[0] for name, c in calls.items()}, device, warmup, iterations)
    forward_backward_ms = interleaved_median_ms({name: c[1] for name, c in calls.items()}, device, warmup, iterations)
    return [Timing(name, forward_ms[name], forward_backward_ms[name]) for name in impls]


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


def print_table(op: str, dtype_name: str, shape: tuple[int, int], itemsize: int, timings: list[Timing]) -> None:
    numel = shape[0] * shape[1]
    forward_bytes = 2 * numel * itemsize  # read x, write y
    forward_backward_bytes = 5 * numel * itemsize  # + read dy, read x, write dx
    ours = timings[0]
    print(f"\n{op} {list(shape)} {dtype_name}")
    print(f"{'implementation':<30} {'fwd ms':>9} {'GB/s':>7} {'x ours':>7} {'fwd+bwd ms':>11} {'GB/s':>7} {'x ours':>7}")
    for t in timings:
        print(f"{t.name:<30} {t.forward_ms:9.2f} {forward_bytes / t.forward_ms / 1e6:7.1f} "
              f"{t.forward_ms / ours.forward_ms:7.2f} {t.forward_backward_ms:11.2f} "
              f"{forward_backward_bytes / t.forward_backward_ms / 1e6:7.1f} "
              f"{t.forward_backward_ms / ours.forward_backward_ms:7.2f}")


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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    iterations = args.iterations or (100 if device.type == "cuda" else 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; kernels: {kernels.backend(device)}; "
          f"median of {iterations} calls after {args.warmup} warm-up")

    jobs = [(op, dtype_name) for op in args.ops for dtype_name in args.dtypes]
    for op, dtype_name in tqdm(jobs, desc="benchmarks", file=sys.stderr):
        dtype = DTYPES[dtype_name]
        hidden = args.hidden if op == "rms_norm" else 4 * args.hidden
        inputs = make_inputs(op, args.rows, hidden, dtype, device)
        grad_out = torch.randn_like(inputs[0])
        timings = time_implementations(implementations(op, device), inputs, grad_out, device, args.warmup,
                                       iterations)
        print_table(op, dtype_name, (args.rows, hidden), inputs[0].element_size(), timings)
        if device.type == "cpu":
            allocation_table(op, inputs, dtype_name, args.warmup, iterations)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
