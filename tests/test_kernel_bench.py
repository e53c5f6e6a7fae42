"""benchmarks/bench_kernels.py runs end to end on CPU (tiny shapes, few calls) and writes the JSON that
the GPU check's report reads; the GPU check's own command line still parses; its PyTorch baselines do what a
user would write (one residual add, not two). The benchmark runs in subprocesses: no test imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import run_with_benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
BENCH = os.path.join(BENCHMARKS, "bench_kernels.py")

# The "add + F.rms_norm" baseline on bench_kernels' own inputs: how many aten.add calls of two tensors of the inputs'
# full shape one forward makes, the inputs, and its outputs (float32 lists: exact through JSON).
ADD_RMS_NORM_BASELINE = r'''
import json
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from bench_kernels import implementations, make_inputs

inputs = make_inputs("add_rms_norm", 8, 32, torch.float32, torch.device("cpu"))
baseline = implementations("add_rms_norm", torch.device("cpu"), False)["add + F.rms_norm"]
adds = []

class CountAdds(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.add and len(args) >= 2 and all(
                isinstance(a, torch.Tensor) and a.shape == inputs[0].shape for a in args[:2]):
            adds.append(str(func))
        return func(*args, **(kwargs or {}))

with torch.no_grad(), CountAdds():
    baseline(*inputs)
h, normed = baseline(*inputs)
print(json.dumps({"full_size_adds": len(adds), "inputs": [t.tolist() for t in inputs], "h": h.tolist(),
                  "normed": normed.tolist()}))
'''


def test_the_add_and_rms_norm_baseline_adds_once():
    """"add + F.rms_norm" is what a user writes: h = residual + delta once, then F.rms_norm(h) (it computed r + d
    twice, so the baseline moved two more tensors than a user's code does)."""
    import torch

    result = run_with_benchmarks(ADD_RMS_NORM_BASELINE)
    assert result["full_size_adds"] == 1, result["full_size_adds"]
    residual, delta, weight = (torch.tensor(values, dtype=torch.float32) for values in result["inputs"])
    h, normed = (torch.tensor(result[name], dtype=torch.float32) for name in ("h", "normed"))
    torch.testing.assert_close(h, residual + delta)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(residual + delta, (32,), weight, 1e-5))


def test_bench_kernels_runs_on_cpu_and_writes_every_figure(tmp_path):
    out = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--rows", "64", "--hidden", "64", "--dtypes",
                           "fp32", "bf16", "--iterations", "2", "--rounds", "1", "--warmup", "1", "--no-compile",
                           "--overhead-calls", "20", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["kernels"] == "fused-cpu"
    expected_tables = {f"{op} {dtype} [64, {256 if op == 'silu' else 64}]"
                       for op in ("rms_norm", "add_rms_norm", "silu") for dtype in ("fp32", "bf16")}
    assert set(results["tables"]) == expected_tables
    theirs = {"rms_norm": "F.rms_norm", "add_rms_norm": "add + F.rms_norm", "silu": "F.silu"}
    for title, table in results["tables"].items():
        names = [row["implementation"] for row in table["implementations"]]
        assert names[0] == "ours (fused-cpu)" and theirs[title.split()[0]] in names, names
        assert table["copy_GB/s"] > 0
        for row in table["implementations"]:
            for phase in ("forward", "backward", "forward+backward"):
                # What the GPU check's report prints, and the device / host split.
                assert row[f"{phase} GB/s"] > 0 and row[f"{phase} of copy"] > 0
                assert row[f"{phase} ms"] > 0 and row[f"{phase} host us"] > 0 and row[f"{phase} timing"] == "wall"
    overhead = results["overhead_us"]
    for name in ("rms_norm ours", "rms_norm F.rms_norm", "add_rms_norm ours", "silu ours", "silu F.silu"):
        for phase in ("forward", "forward+backward"):
            assert overhead[f"{name} {phase}"] > 0
    assert "per-call host overhead" in done.stdout


def test_the_gpu_checks_command_line_parses(tmp_path):
    """gpu_check/gpu_check.sh's call; on a machine without a GPU it stops at the device check (exit 2),
    on one with a GPU it runs (at a small shape here)."""
    import torch  # noqa: PLC0415 - only to know which outcome to expect

    small = ["--rows", "512", "--iterations", "3", "--rounds", "1", "--no-compile"] if torch.cuda.is_available() else []
    gpu_check_flags = ["--device", "cuda", "--ops", "rms_norm", "silu", "--dtypes", "bf16",
                       "--json", str(tmp_path / "kernels.json")]
    done = subprocess.run([sys.executable, BENCH, *gpu_check_flags, *small], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if torch.cuda.is_available():
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode == 2 and "torch.cuda.is_available() is False" in done.stderr, done.stderr[-3000:]
