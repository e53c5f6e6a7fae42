"""The GPU-only paths of a training step, run on the CPU through their switches.

- The kernel plan (ours or PyTorch's RMSNorm/SiLU per shape) is made once in wrap_model, before step 1, from a
  recording forward: LIME_KERNEL_CHOICE_DEVICES=cpu makes a CPU run take it, so a run with
  --recompute-activations proves nothing is timed inside an activation checkpoint's recomputation (that crashed
  the first step with "CheckpointError: Recomputed values ... different metadata" when the timing ran inside
  the forward).
"""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_pretraining_data, train_tiny


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")), num_docs=60)


def test_kernel_plan_runs_before_step_one_with_recompute_activations(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LIME_KERNEL_CHOICE_DEVICES", "cpu")
    monkeypatch.setenv("MEGATRON_LIME_CACHE", str(tmp_path / "cache"))
    run = train_tiny(tiny_data, tmp_path / "ckpt", "--recompute-activations", "--train-iters", "2")
    assert run.returncode == 0, run.stdout[-3000:]
    lines = run.stdout.splitlines()
    plan = [i for i, line in enumerate(lines) if line.startswith("> kernel choice:")]
    first_step = next(i for i, line in enumerate(lines) if "iteration        1/" in line or "iteration 1/" in line)
    # lime-tiny, micro batch 2 x seq 32 = 64 rows: the norms at width 64 and the SiLU at 256, each timed once
    assert len(plan) == 3 and max(plan) < first_step, "\n".join(lines)
    assert any("rms_norm (64, 64) float32" in lines[i] for i in plan)
    assert any("silu (64, 256) float32" in lines[i] for i in plan)
    entries = json.loads((tmp_path / "cache" / "kernel_choices.json").read_text())["entries"]
    assert len(entries) == 3
    # A second run reads the plan from disk.
    again = train_tiny(tiny_data, tmp_path / "ckpt2", "--recompute-activations", "--train-iters", "1")
    assert again.returncode == 0, again.stdout[-3000:]
    assert sum("(forward+backward, cached)" in line for line in again.stdout.splitlines()) == 3
