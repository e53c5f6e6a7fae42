"""Time the fused RMSNorm, residual add + RMSNorm and SiLU against PyTorch's own ops, torch.compile and apex.

    python benchmarks/bench_kernels.py --device cuda --ops rms_norm silu --dtypes bf16 --json kernels.json
    python benchmarks/bench_kernels.py --device cuda --ops rms_norm add_rms_norm silu   # every op, fp32 and bf16
    python benchmarks/bench_kernels.py --device cpu --rows 2048 --iterations 5 --no-compile   # a quick CPU run

Shapes are the model's: lime-1b's rows at sequence length 512 for micro-batches 16, 32 and 64
(--batches; [8192, 1536], [16384, 1536], [32768, 1536]), SiLU on the MLP's [rows, 6144].

Per implementation and phase (forward, backward, forward+backward) it prints:
  * device time: on CUDA, one call captured in a CUDA graph and replayed (the kernels alone, no
    host work between them; CUDA events around back-to-back calls where capture fails, marked);
    on CPU, the wall time of a call;
  * host time: wall time per call with no synchronisation (what Python, autograd and the
    dispatcher cost the CPU per call: the per-call overhead; on CPU it includes the kernel);
  * GB/s: the bytes the op must move (BYTES_MOVED below) over the device time, and that as a
    fraction of a device-to-device copy of the same size in the same run: the floor of any op
    that reads and writes the same bytes.
Then the per-call host overhead at a tiny shape ([4, 64]), ours against F.rms_norm / F.silu.
Implementations run round-robin on the same inputs, so load from other processes falls on all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from tqdm import tqdm

from bench_common import Stopwatch, ms_per_call, synchronize
from megatron_lime import kernels
from megatron_lime.files import write_json

EPS = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHASES = ("forward", "backward", "forward+backward")

# Tensors of x's size each phase must read or write at least (weight, rstd: one row, left out).
#   rms_norm      forward reads x, writes y; backward reads dy and x, writes dx.
#   add_rms_norm  forward reads residual and delta, writes h and y; backward reads dy, dh and h,
#                 writes one gradient (that of residual and of delta are the same tensor).
#   silu          forward reads x, writes y; backward reads dy and x, writes dx.
BYTES_MOVED = {
    "rms_norm": {"forward": 2, "backward": 3, "forward+backward": 5},
    "add_rms_norm": {"forward": 4, "backward": 4, "forward+backward": 8},
    "silu": {"forward": 2, "backward": 3, "forward+backward": 5},
}


def load_apex():
    """apex's fused_layer_norm module, or None where apex (optional) is not installed."""
    try:
        from apex.normalization import fused_layer_norm  # noqa: PLC0415 - optional dependency
    except Exception:  # ImportError, or a broken build of apex's extension
        return None
    return fused_layer_norm


def compiled(fn: Callable[..., object]) -> Callable[..., object]:
    """torch.compile with dynamic shapes: one compilation serves every row count (the GPU check's
    kernels stage has 150 s; a compilation per shape would take most of it)."""
    return torch.compile(fn, dynamic=True)


# "backward" below replays the backward of one retained graph (retain_graph=True); a compiled backward
# that was given its saved buffers to reuse (donated) refuses that, as it did for add + RMSNorm.
functorch_config.donated_buffer = False


# One compiled reference per op, kept across shapes and dtypes (compiled on first use).
COMPILED = {
    "rms_norm": compiled(lambda x, w: kernels.rms_norm_ref(x, w, EPS)),
    "add_rms_norm": compiled(lambda r, d, w: kernels.add_rms_norm_ref(r, d, w, EPS)),
    "silu": compiled(kernels.silu_ref),
}


def add_then_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a user writes without our kernel: the new residual stream h = residual + delta, once, then F.rms_norm(h).
    Returns (h, normed), as kernels.add_rms_norm does."""
    h = residual + delta
    return h, F.rms_norm(h, (h.shape[-1],), weight, EPS)


def implementations(op: str, device: torch.device, with_compile: bool) -> dict[str, Callable[..., object]]:
    """Name -> function of the op's inputs: (x, weight), (residual, delta, weight) or (x,)."""
    ours = f"ours ({kernels.backend(device)})"
    found: dict[str, Callable[..., object]]
    if op == "rms_norm":
        found = {ours: lambda x, w: kernels.rms_norm(x, w, EPS),
                 "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
                 "eager reference": lambda x, w: kernels.rms_norm_ref(x, w, EPS)}
        if with_compile:
            found["torch.compile(reference)"] = COMPILED["rms_norm"]
        apex = load_apex() if device.type == "cuda" else None
        if apex is not None:
            found["apex FusedRMSNorm"] = lambda x, w: apex.fused_rms_norm_affine(x, w, w.shape, EPS)
    elif op == "add_rms_norm":
        found = {ours: lambda r, d, w: kernels.add_rms_norm(r, d, w, EPS),
                 "add + F.rms_norm": add_then_rms_norm,
                 "eager reference": lambda r, d, w: kernels.add_rms_norm_ref(r, d, w, EPS)}
        if with_compile:
            found["torch.compile(reference)"] = COMPILED["add_rms_norm"]
    else:
        found = {ours: kernels.silu, "F.silu": F.silu, "eager reference": kernels.silu_ref}
        if with_compile:
            found["torch.compile(reference)"] = COMPILED["silu"]
    return found


def make_inputs(op: str, rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device=device, dtype=dtype)
    if op == "rms_norm":
        return [x, weight]
    if op == "add_rms_norm":
        return [x, torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype), weight]
    return [x]


def phase_calls(fn: Callable[..., object], inputs: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """Forward alone (no autograd), backward alone (of one retained graph), forward+backward; the
    gradients are returned by torch.autograd.grad (no accumulation into .grad)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    detached = [t.detach() for t in inputs]
    retained = fn(*leaves)
    outputs = retained if isinstance(retained, tuple) else (retained,)
    grads = [torch.randn_like(o) for o in outputs]

    def forward() -> None:
        with torch.no_grad():
            fn(*detached)

    def backward() -> None:
        torch.autograd.grad(outputs, leaves, grads, retain_graph=True)

    def forward_backward() -> None:
        out = fn(*leaves)
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves, grads)

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}


@dataclass
class Timing:
    device_ms: float
    host_us: float
    method: str  # "graph", "events" or "wall"


def host_us_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall time per call with no synchronisation inside the loop: the host's cost of a call
    (the GPU queue absorbs the kernels); on CPU it includes the kernel itself."""
    synchronize(device)
    with Stopwatch() as watch:  # no drain at the end: the host's time alone
        for _ in range(calls):
            fn()
    synchronize(device)
    return watch.seconds / calls * 1e6


def cuda_graph_ms(fn: Callable[[], object], iterations: int, device: torch.device) -> float | None:
    """Device time of one call: fn captured once in a CUDA graph, replayed `iterations` times
    between CUDA events, 3 rounds, the median. None when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # an op that synchronises or allocates in a way capture refuses
        synchronize(device)
        return None
    return statistics.median([ms_per_call(graph.replay, device, iterations) for _ in range(3)])


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> Timing:
    for _ in range(warmup):
        fn()
    synchronize(device)
    host = host_us_per_call(fn, device, iterations)
    if device.type != "cuda":
        return Timing(host / 1e3, host, "wall")
    graph = cuda_graph_ms(fn, iterations, device)
    if graph is not None:
        return Timing(graph, host, "graph")
    return Timing(ms_per_call(fn, device, iterations), host, "events")


def time_implementations(impls: dict[str, Callable[..., object]], inputs: list[torch.Tensor], device: torch.device,
                         warmup: int, iterations: int, rounds: int) -> dict[str, dict[str, Timing]]:
    """Per implementation and phase, the median over `rounds` round-robin rounds."""
    calls = {name: phase_calls(fn, inputs) for name, fn in impls.items()}
    samples: dict[tuple[str, str], list[Timing]] = {}
    for _ in range(rounds):
        for phase in PHASES:
            for name in impls:
                samples.setdefault((name, phase), []).append(time_call(calls[name][phase], device, warmup, iterations))
    result: dict[str, dict[str, Timing]] = {}
    for (name, phase), timings in samples.items():
        result.setdefault(name, {})[phase] = Timing(statistics.median(t.device_ms for t in timings),
                                                    statistics.median(t.host_us for t in timings), timings[0].method)
    return result


def copy_timing(like: torch.Tensor, device: torch.device, warmup: int, iterations: int) -> Timing:
    """One device-to-device copy of a tensor like `like` (read + write: the floor of a one-pass op)."""
    source, destination = torch.randn_like(like), torch.empty_like(like)
    return time_call(lambda: destination.copy_(source), device, warmup, iterations)


def table_rows(op: str, timings: dict[str, dict[str, Timing]], tensor_bytes: int,
               copy_gbps: float) -> list[dict[str, float | str]]:
    rows = []
    for name, phases in timings.items():
        row: dict[str, float | str] = {"implementation": name}
        for phase, t in phases.items():
            gbps = BYTES_MOVED[op][phase] * tensor_bytes / t.device_ms / 1e6
            row.update({f"{phase} ms": t.device_ms, f"{phase} host us": t.host_us, f"{phase} GB/s": gbps,
                        f"{phase} of copy": gbps / copy_gbps, f"{phase} timing": t.method})
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict], copy: Timing, copy_gbps: float) -> None:
    print(f"\n{title}: a copy moves {copy_gbps:.0f} GB/s ({copy.device_ms * 1e3:.1f} us, {copy.method}); per phase "
          f"device ms, host us per call, GB/s, fraction of the copy")
    header = "".join(f" | {phase:>16} {'host us':>8} {'GB/s':>6} {'copy':>5}" for phase in PHASES)
    print(f"{'implementation':<26}{header}")
    for row in rows:
        cells = "".join(f" | {row[f'{p} ms']:16.4f} {row[f'{p} host us']:8.1f} {row[f'{p} GB/s']:6.0f} "
                        f"{row[f'{p} of copy']:5.2f}" for p in PHASES)
        print(f"{row['implementation']:<26}{cells}")


def overhead_table(device: torch.device, calls: int) -> dict[str, float]:
    """Microseconds per call at a tiny shape ([4, 64]), where the kernel is nothing and the call is
    everything: ours against PyTorch's, forward without autograd and forward+backward."""
    x = torch.randn(4, 64, device=device)
    delta = torch.randn(4, 64, device=device)
    w = torch.ones(64, device=device)
    cases = {
        "rms_norm ours": lambda a, b: kernels.rms_norm(a, w, EPS),
        "rms_norm F.rms_norm": lambda a, b: F.rms_norm(a, (64,), w, EPS),
        "add_rms_norm ours": lambda a, b: kernels.add_rms_norm(a, b, w, EPS)[1],
        "add_rms_norm add + F.rms_norm": lambda a, b: F.rms_norm(a + b, (64,), w, EPS),
        "silu ours": lambda a, b: kernels.silu(a),
        "silu F.silu": lambda a, b: F.silu(a),
    }
    xg, dg = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    grad = torch.ones_like(x)
    result = {}
    for name, fn in cases.items():
        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn(x, delta)

        def forward_backward(fn=fn) -> None:
            torch.autograd.grad(fn(xg, dg), (xg,), grad)

        for phase, call in (("forward", forward), ("forward+backward", forward_backward)):
            for _ in range(50):
                call()
            result[f"{name} {phase}"] = min(host_us_per_call(call, device, calls) for _ in range(5))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=tuple(BYTES_MOVED), default=["rms_norm", "add_rms_norm", "silu"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64],
                        help="micro-batch sizes: rows = batch x --seq-length")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--rows", nargs="+", type=int, default=None, help="row counts instead of --batches")
    parser.add_argument("--hidden", type=int, default=1536, help="RMSNorm width (SiLU uses 4x: the MLP)")
    parser.add_argument("--iterations", type=int, default=None, help="timed calls (default: 100 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the median is reported")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile(reference) out")
    parser.add_argument("--overhead-calls", type=int, default=2000, help="calls per sample of the overhead table")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    # Ours means our kernels here, at every shape: the per-shape choice would otherwise hand some
    # shapes to PyTorch's op and the "ours" row would measure PyTorch.
    kernels.set_kernel_choice("ours")
    iterations = args.iterations or (100 if device.type == "cuda" else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; kernels: {kernels.backend(device)}; "
          f"{args.rounds} rounds of {iterations} calls after {args.warmup} warm-up, medians")
    row_counts = args.rows or [b * args.seq_length for b in args.batches]
    results = {"device": name, "torch": torch.__version__, "kernels": kernels.backend(device),
               "bytes_moved_in_tensors": BYTES_MOVED, "tables": {}, "overhead_us": {}}
    jobs = [(op, dtype_name, rows) for op in args.ops for dtype_name in args.dtypes for rows in row_counts]
    for op, dtype_name, rows in tqdm(jobs, desc="benchmarks", file=sys.stderr):
        hidden = 4 * args.hidden if op == "silu" else args.hidden
        inputs = make_inputs(op, rows, hidden, DTYPES[dtype_name], device)
        timings = time_implementations(implementations(op, device, not args.no_compile), inputs, device, args.warmup,
                                       iterations, args.rounds)
        tensor_bytes = rows * hidden * inputs[0].element_size()
        copy = copy_timing(inputs[0], device, args.warmup, iterations)
        copy_gbps = 2 * tensor_bytes / copy.device_ms / 1e6
        rows_out = table_rows(op, timings, tensor_bytes, copy_gbps)
        title = f"{op} {dtype_name} [{rows}, {hidden}]"
        print_table(title, rows_out, copy, copy_gbps)
        results["tables"][title] = {"shape": [rows, hidden], "copy_ms": copy.device_ms, "copy_GB/s": copy_gbps,
                                    "copy_timing": copy.method, "implementations": rows_out}
        if args.json:
            write_json(args.json, results)
    results["overhead_us"] = overhead_table(device, args.overhead_calls)
    print("\nper-call host overhead at [4, 64] fp32 (us per call, the best of 5 samples):")
    for key, us in results["overhead_us"].items():
        print(f"  {key:<48} {us:8.2f}")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
