"""benchmarks/gpu_check.sh on a machine without a GPU: it runs its first stages, then stops at the
GPU check with a clear message and exit 3 (never hangs), and still writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def run_check(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "",  # no GPU, even on a machine that has one
           "LIME_GPU_WHEELS": str(tmp_path / "no-wheelhouse")}  # a failing stage must not stop the next
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_without_a_gpu_stops_at_the_gpu_stage(tmp_path):
    result = run_check(tmp_path, "--dry-run")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no CUDA GPU visible" in result.stdout
    assert "stopped before the first GPU stage (exit 3)" in result.stdout
    assert "no wheelhouse at" in result.stdout  # the install stage failed, was reported, and the check went on
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [
        ("environment", "ok"), ("install", "failed"), ("gpu", "failed")]
    assert report["dry_run"] is True and report["kernels"] is None and report["train"] is None
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== stage gpu" in log and "===== stage build" not in log


def test_bad_arguments_are_refused(tmp_path):
    result = run_check(tmp_path, "--only", "everything")
    assert result.returncode == 2 and "--only everything: not a stage" in result.stderr
    assert run_check(tmp_path, "--fast").returncode == 2
