"""benchmarks/step_cost.py, the step's cost model: its counts of a known op sequence worked out by hand, its
multi-tensor-apply launch estimate, and a quick run (lime-tiny) whose JSON has every figure and whose extrapolation
reproduces a run it did not use.

Everything runs as a subprocess (the tests never import from benchmarks/ in their own process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import run_with_benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "step_cost.py")


# Inputs are made outside the mode; f32 = 4 bytes, bf16 = 2.
KNOWN_OPS = r"""
import json, torch
from deepspeed.accelerator import get_accelerator
from step_cost import counting, mta_launches
a, b = torch.randn(4, 8), torch.randn(8, 16)
w, g, h = torch.randn(16), torch.empty(4, 16), torch.zeros(4, 16)
x = torch.randn(4, 16).bfloat16()
p, q = [torch.randn(100_000), torch.randn(10)], [torch.randn(100_000), torch.randn(10)]
with counting() as counts:
    c = a @ b                       # mm: 2*4*8*16 FLOPs; reads 128 + 512, writes 256
    torch.addmm(h, a, b, out=h)     # the same FLOPs; h is an input too: reads 256 + 128 + 512, writes 256
    h.addmm_(a, b)                  # in place: the same FLOPs and bytes
    e = c + w.expand(4, 16)         # add: reads 256 + 64 (the broadcast dim not counted), writes 256
    f = e.t().contiguous()          # t: a view; clone: reads 256, writes 256
    e.mul_(2.0)                     # in place: reads 256, writes 256
    e.zero_()                       # writes only: 256
    torch.add(c, c, out=g)          # out=: c read once (256), g written (256)
    s = e.sum()                     # sum: reads 256, writes 4
    s.item()                        # _local_scalar_dense: a host sync, no launch, reads 4
    y = x.float()                   # _to_copy: reads 128, writes 256
    torch._foreach_add_(p, q)       # depth 2, 2 + 1 blocks: one launch; reads 2 x 400,040, writes 400,040
    get_accelerator().synchronize() # a host sync
ops = {name: {k: getattr(op, k) for k in ("calls", "launches", "flops", "bytes_read", "bytes_written", "syncs")}
       for name, op in counts.ops.items()}
mta = [mta_launches([320 * 65536], 2), mta_launches([320 * 65536 + 1], 2), mta_launches([1] * 64, 2),
       mta_launches([1] * 65, 2), mta_launches([1] * 36, 4), mta_launches([1] * 37, 4), mta_launches([0, 5], 1)]
print(json.dumps({"ops": ops, "summary": counts.summary(), "mta": mta}))
"""


def test_counts_of_a_known_op_sequence():
    result = run_with_benchmarks(KNOWN_OPS, DS_ACCELERATOR="cpu")
    ops = result["ops"]

    def check(name, calls, launches, read, written, flops=0, syncs=0):
        op = ops[name]
        assert (op["calls"], op["launches"], op["bytes_read"], op["bytes_written"], op["flops"], op["syncs"]) == (
            calls, launches, read, written, flops, syncs), (name, op)

    check("aten.mm", 1, 1, 128 + 512, 256, flops=2 * 4 * 8 * 16)
    check("aten.addmm", 1, 1, 256 + 128 + 512, 256, flops=2 * 4 * 8 * 16)
    check("aten.addmm_", 1, 1, 256 + 128 + 512, 256, flops=2 * 4 * 8 * 16)
    check("aten.add", 2, 2, (256 + 64) + 256, 256 + 256)  # c + w.expand, then add(c, c, out=g)
    check("aten.clone", 1, 1, 256, 256)
    check("aten.mul_", 1, 1, 256, 256)
    check("aten.zero_", 1, 1, 0, 256)
    check("aten.sum", 1, 1, 256, 4)
    check("aten._local_scalar_dense", 1, 0, 4, 0, syncs=1)
    check("aten._to_copy", 1, 1, 128, 256)
    check("aten._foreach_add_", 1, 1, 2 * 400_040, 400_040)
    check("accelerator.synchronize", 1, 0, 0, 0, syncs=1)
    assert not any(name in ops for name in ("aten.t", "aten.expand", "aten.transpose", "aten.view"))
    summary = result["summary"]
    assert summary["launches"] == 11 and summary["host_syncs"] == 2
    assert summary["matmul_flops"] == summary["flops"] == 3 * 1024
    assert summary["memory_bound_bytes"] == summary["bytes"] - (128 + 512 + 256) - 2 * (256 + 128 + 512 + 256)
    # 320 blocks of 65,536 per launch; 64 tensors per launch with 2 lists, 36 with 4; empty tensors skipped
    assert result["mta"] == [1, 2, 1, 2, 1, 2, 1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("step_cost") / "cost.json"
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(path.read_text()), done.stdout


def test_quick_run_writes_every_figure(quick_run):
    results, stdout = quick_run
    assert results["model"] == "lime-tiny" and results["precisions"]
    assert "bf16" in results["precisions"]
    for precision, entry in results["precisions"].items():
        for who in ("ours", "peer"):
            figures = entry[who]
            for key in ("memory_bytes_per_token", "launches_per_token", "projected_h100_tokens_per_s",
                        "flops_per_token", "matmul_flops_per_token"):
                assert figures[key] > 0, (precision, who, key)
            assert figures["host_syncs_per_step"] >= 0
            assert figures["matmul_flops_per_token"] <= figures["flops_per_token"]
            assert figures["memory_bytes_per_token"] < figures["bytes_per_token"]
        # the same model and tokens: the matmul FLOPs of ours and the peer agree within the peer's extra biases
        ratio = entry["ours"]["matmul_flops_per_token"] / entry["peer"]["matmul_flops_per_token"]
        assert 0.95 < ratio < 1.05
    # DeepSpeed's overflow check reads its flag back: ours has host syncs, and the table says which
    assert results["precisions"]["bf16"]["ours"]["host_syncs_per_step"] >= 1
    assert "host syncs per step: aten._local_scalar_dense" in stdout
    # our loss body is counted as the 2 kernels it compiles to on CUDA, not as the CPU's eager passes:
    # 2 per chunk of 1,024 tokens (lime-tiny's loss_chunk_size)
    body = results["precisions"]["bf16"]["32x2"]["ours"]["ops_per_token"]["inductor.chunk_loss_body"]
    assert body["launches"] == pytest.approx(2 / 1024)
    assert "aten.exp_" not in results["precisions"]["bf16"]["32x2"]["ours"]["ops_per_token"]


def test_extrapolation_reproduces_a_run_it_did_not_use(quick_run):
    """3 layers predicted from 1 and 2: exact, but for multi-tensor-apply launches (tensors pack unevenly)."""
    results, _ = quick_run
    checks = results["extrapolation_check"]
    assert "ours bf16" in checks and "peer bf16" in checks
    for name, errors in checks.items():
        assert set(errors) >= {"flops", "matmul_flops", "memory_bound_bytes", "bytes", "launches", "host_syncs"}
        for key, error in errors.items():
            assert error < (1e-2 if key == "launches" else 1e-9), (name, key, error)
