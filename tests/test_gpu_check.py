"""benchmarks/gpu_check.sh end to end on a machine without a GPU: the dry run runs every stage's code at tiny sizes
on the CPU (the benchmarks' tables side by side, the profile table, the report); without --dry-run the check
stops at the GPU stage with exit 3 and still writes its JSON; the install stage's import check sees the folder it
installed into (the first GPU call's check did not, so every later stage lacked deepspeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def fake_wheelhouse(folder) -> str:
    """Two pure-Python wheels named deepspeed and datasets (version 0.0.1): what the install stage imports."""
    os.makedirs(folder, exist_ok=True)
    for name in ("deepspeed", "datasets"):
        info = f"{name}-0.0.1.dist-info"
        files = {f"{name}/__init__.py": '__version__ = "0.0.1"\n',
                 f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n",
                 f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
        files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
        with zipfile.ZipFile(os.path.join(folder, f"{name}-0.0.1-py3-none-any.whl"), "w") as wheel:
            for path, text in files.items():
                wheel.writestr(path, text)
    return str(folder)


def run_check(tmp_path, *args: str, wheels: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "",  # no GPU, even on a machine that has one
           "LIME_GPU_WHEELS": wheels or str(tmp_path / "no-wheelhouse")}
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def stages(tmp_path) -> list[tuple[str, str]]:
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return [(s["stage"], s["status"]) for s in report["stages"]]


def test_without_a_gpu_the_check_stops_at_the_gpu_stage_after_a_real_install(tmp_path):
    result = run_check(tmp_path, wheels=fake_wheelhouse(tmp_path / "wheels"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no CUDA GPU visible" in result.stdout
    assert "stopped before the first GPU stage (exit 3)" in result.stdout
    assert stages(tmp_path) == [("environment", "ok"), ("install", "ok"), ("gpu", "failed")]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    # The check imported what it installed, from the private folder, not the environment's deepspeed.
    assert "deepspeed 0.0.1 from /tmp/lime-gpu-check." in log and "/site/deepspeed/__init__.py" in log, log
    assert "===== stage gpu" in log and "===== stage build" not in log
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] is False and report["train"] is None and report["peer"] is None


def test_a_failing_stage_does_not_stop_the_next(tmp_path):
    result = run_check(tmp_path)  # no wheelhouse: install fails, the GPU stage still runs
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no wheelhouse at" in result.stdout
    assert stages(tmp_path) == [("environment", "ok"), ("install", "failed"), ("gpu", "failed")]


def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """The whole check at tiny sizes: our step and the peer side by side, the profile, the kernels, the report."""
    # About 6.5 minutes on a 2-core CPU shared with other jobs (the check's own dry-run budget is 1,800 s).
    result = run_check(tmp_path, "--dry-run", wheels=fake_wheelhouse(tmp_path / "wheels"), timeout=1900)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-6000:] + (out / "gpu_check.log").read_text()[-6000:]
    assert stages(tmp_path) == [(name, "ok") for name in
                                ("environment", "install", "gpu", "build", "train", "peer", "kernels", "tests")]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and " passed" in report["tests"]
    rows = ["pretrain mb2x1 eager", "pretrain mb2x2 eager", "pretrain mb2x1 compile", "pretrain mb2x2 compile"]
    for name in rows:
        ours, peer = report["train"]["runs"][name], report["peer"]["runs"][name]
        assert ours["tokens_per_second"] > 0 and peer["tokens_per_second"] > 0, (name, ours, peer)
        assert ours["accumulation"] == peer["accumulation"] == int(name.split("x")[1].split()[0])
        assert ours["skipped_steps"] == 0
    assert {"sft-packed mb2x2 eager", "sft-packed mb2x2 compile"} <= set(report["train"]["runs"])
    table = (out / "gpu_check.txt").read_text()
    assert "| pretrain mb2x2 compile |" in table and "ours / peer" in table
    ratio = next(line for line in table.splitlines() if line.startswith("| pretrain mb2x2 eager |")).split("|")[4]
    assert float(ratio) > 0
    profile = (out / "profile_ours.md").read_text()
    assert profile.count("### ours: pretrain mb2x2") == 2 and profile.count("\n| `") >= 10  # both modes, top ops
    assert report["kernels"]["tables"]


def test_bad_arguments_are_refused(tmp_path):
    result = run_check(tmp_path, "--only", "everything")
    assert result.returncode == 2 and "--only everything: not a stage" in result.stderr
    assert run_check(tmp_path, "--fast").returncode == 2
