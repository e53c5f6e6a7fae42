"""gpu_check/gpu_check.sh end to end on a machine without a GPU: the dry run runs every stage's code at tiny sizes
on the CPU (ours in both precisions and the peer side by side, ours / peer as numbers in the JSON, the kernel
choice plan's lines, the profile table, the report); without --dry-run the check stops at the GPU stage with exit 3
and still writes its JSON; the install stage's import check sees the folder it installed into (the first GPU
call's check did not, so every later stage lacked deepspeed), checks what training imports and nothing else, and
a wheel that fails to install or import keeps neither deepspeed nor the rest off the path. The report's
comparison, OOM rows included, is checked on hand-made benchmark JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "gpu_check")
SCRIPT = os.path.join(GPU_CHECK, "gpu_check.sh")


def fake_wheel(folder, name: str, init: str = '__version__ = "0.0.1"\n') -> None:
    """A pure-Python wheel `name` 0.0.1 whose package's __init__.py is `init`."""
    info = f"{name}-0.0.1.dist-info"
    files = {f"{name}/__init__.py": init,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(os.path.join(folder, f"{name}-0.0.1-py3-none-any.whl"), "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def fake_wheelhouse(folder, broken: bool = False) -> str:
    """A pure-Python wheel named deepspeed (version 0.0.1): what the install stage imports. broken: beside it, a
    `datasets` wheel whose import fails (as datasets did where pyarrow was too old; training never imports it) and a
    wheel that does not install at all (not a zip file)."""
    os.makedirs(folder, exist_ok=True)
    fake_wheel(folder, "deepspeed")
    if broken:
        fake_wheel(folder, "datasets", init='raise ImportError("datasets needs pyarrow>=24")\n')
        with open(os.path.join(folder, "aaa_broken-0.0.1-py3-none-any.whl"), "wb") as handle:
            handle.write(b"not a wheel")
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
    assert "stages: peer,train;" in result.stdout  # the headline call: ours and the peer
    assert "stopped before the first GPU stage (exit 3)" in result.stdout
    assert stages(tmp_path) == [("environment", "ok"), ("install", "ok"), ("gpu", "failed")]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    # The check imported what it installed, from the private folder, not the environment's deepspeed.
    assert "deepspeed 0.0.1 from /tmp/lime-gpu-check." in log and "/site/deepspeed/__init__.py" in log, log
    assert "===== stage gpu" in log and "===== stage build" not in log
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] is False and report["train"] is None and report["peer"] is None


def test_a_wheel_that_fails_keeps_neither_deepspeed_nor_the_rest_off_the_path(tmp_path):
    """The first GPU call's install checked `import deepspeed, datasets`; where one failed, no later stage had
    deepspeed. Now each wheel installs on its own, the import check is what training imports (no datasets), and the
    folder goes on the path whatever failed."""
    result = run_check(tmp_path, wheels=fake_wheelhouse(tmp_path / "wheels", broken=True))
    assert result.returncode == 3, result.stdout + result.stderr
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "aaa_broken-0.0.1-py3-none-any.whl did not install (the others are in place)" in log, log
    assert "installed deepspeed-0.0.1-py3-none-any.whl" in log and "installed datasets-0.0.1" in log, log
    assert "deepspeed 0.0.1 from /tmp/lime-gpu-check." in log and "datasets" not in log.split("===== stage gpu")[0] \
        .split("taken from the wheel folder:")[1], log
    # The install stage reports the broken wheel; the GPU stage still runs (and stops the check: no GPU here).
    assert stages(tmp_path) == [("environment", "ok"), ("install", "failed"), ("gpu", "failed")]


def test_the_import_check_is_what_training_imports():
    """The install stage imports what the later stages import (training with deepspeed, the peer's GPT-2), and
    neither datasets nor anything else training does not import."""
    script = open(SCRIPT, encoding="utf-8").read()
    check = script.split("IMPORT_CHECK='")[1].split("'")[0]
    imports = [line for line in check.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import os, sys", "import deepspeed",
                       "import megatron_lime.training.pretrain, megatron_lime.training.wrap",
                       "from transformers import GPT2Config, GPT2LMHeadModel"], imports
    wheels = open(os.path.join(GPU_CHECK, "gpu_wheels.sh"), encoding="utf-8").read()
    downloaded = wheels.split("DOWNLOADED=(")[1].split(")")[0].split()
    assert "datasets" not in downloaded and {"hjson", "pydantic", "pydantic-core"} <= set(downloaded), downloaded


def test_a_failing_stage_does_not_stop_the_next(tmp_path):
    result = run_check(tmp_path)  # no wheelhouse: install fails, the GPU stage still runs
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no wheelhouse at" in result.stdout
    assert stages(tmp_path) == [("environment", "ok"), ("install", "failed"), ("gpu", "failed")]


def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """The whole check at tiny sizes: our step in both precisions and the peer side by side, ours / peer as numbers,
    the kernel choice plan, the profile, the kernels, the report."""
    # About 6 minutes on a 2-core CPU shared with other jobs (the check's own dry-run budget is 1,800 s).
    result = run_check(tmp_path, "--dry-run", wheels=fake_wheelhouse(tmp_path / "wheels"), timeout=1900)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-6000:] + (out / "gpu_check.log").read_text()[-6000:]
    every = ("environment", "install", "gpu", "build", "peer", "train", "kernels", "tests", "profile")
    assert sorted(stages(tmp_path)) == sorted((name, "ok") for name in every)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and " passed" in report["tests"]
    # Ours: the recipe's DeepSpeed file, one process per precision and mode, each precision as training runs it.
    train = report["train"]
    assert train["deepspeed_config_file"].endswith("examples/ds_config_zero1_bf16.json")
    processes = train["processes"]
    assert set(processes) == {"bf16 eager", "bf16 compile", "autocast eager", "autocast compile"}
    for name, facts in processes.items():
        precision = name.split()[0]
        assert facts["parameter_dtypes"] == ["torch.bfloat16" if precision == "bf16" else "torch.float32"], name
        assert facts["deepspeed_config"]["bf16"]["enabled"] is (precision == "bf16")
        assert facts["deepspeed_config"]["torch_autocast"]["enabled"] is (precision == "autocast")
        assert facts["deepspeed_config"]["zero_optimization"]["reduce_bucket_size"] == 500000000  # the recipe's file
        assert any(line.startswith("kernel choice: ") for line in facts["kernel_choices"]), facts
    assert "kernel plan (bf16 eager): kernel choice: " in (out / "gpu_check.txt").read_text()
    # ours / peer per row and precision, as numbers.
    entries = {(entry["row"], entry["precision"]): entry for entry in report["ours_over_peer"]}
    for mode in ("eager", "compile"):
        peer = report["peer"]["runs"][f"pretrain mb2x2 {mode}"]
        assert peer["tokens_per_second"] > 0 and peer["accumulation"] == 2
        for precision in ("bf16", "autocast"):
            ours = train["runs"][f"pretrain mb2x2 {mode} {precision}"]
            assert ours["skipped_steps"] == 0 and ours["accumulation"] == 2 and ours["precision"] == precision
            entry = entries[(f"pretrain mb2x2 {mode}", precision)]
            assert entry["ours_over_peer"] == ours["tokens_per_second"] / peer["tokens_per_second"] > 0, entry
            assert report["ours_over_peer_by_row"][f"pretrain mb2x2 {mode}"][precision] == entry["ours_over_peer"]
    table = (out / "gpu_check.txt").read_text()
    assert "| pretrain mb2x2 compile | autocast |" in table and "ours / peer" in table
    line = next(line for line in table.splitlines() if line.startswith("| pretrain mb2x2 eager | bf16 |"))
    ratio = line.split("|")[5]
    assert float(ratio) > 0
    profile = (out / "profile_ours.md").read_text()
    assert profile.count("### ours: pretrain mb2x2 eager bf16") == 1 and profile.count("\n| `") >= 10
    assert report["profile"]["profiles"] and report["kernels"]["tables"]


def run_report(tmp_path, train: dict, peer: dict) -> dict:
    """gpu_check_report.py over hand-made benchmark JSON; returns gpu_check.json."""
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    (tmp_path / "stages.tsv").write_text("train\tok\t100\t\npeer\tfailed\t90\texit 1\n")
    done = subprocess.run([sys.executable, os.path.join(GPU_CHECK, "gpu_check_report.py"), "--stages",
                           str(tmp_path / "stages.tsv"), "--work", str(tmp_path), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "gpu_check.json").read_text())


def test_the_report_gives_ours_over_peer_per_row_and_precision_and_says_oom(tmp_path):
    def row(mode, precision, tokens, micro=16, accumulation=4, **extra):
        return {"batch": "pretrain", "micro_batch_size": micro, "accumulation": accumulation, "mode": mode,
                "precision": precision, "tokens_per_second": tokens, "mfu_datasheet": 0.4, "peak_memory_gib": 30.0,
                **extra}

    oom = {"batch": "pretrain", "micro_batch_size": 64, "accumulation": 1, "mode": "eager", "precision": None,
           "error": "out of memory: CUDA out of memory. Tried to allocate 12.00 GiB", "oom": True}
    train = {"runs": {"pretrain mb16x4 eager bf16": row("eager", "bf16", 66000.0),
                      "pretrain mb16x4 eager autocast": row("eager", "autocast", 55000.0),
                      "pretrain mb64x1 eager bf16": row("eager", "bf16", 70000.0, micro=64, accumulation=1),
                      "autocast compile (all)": {"mode": "compile", "precision": "autocast", "error": "RuntimeError: x",
                                                 "oom": False}},
             "processes": {}, "seq_length": 512}
    peer = {"runs": {"pretrain mb16x4 eager": row("eager", None, 60000.0), "pretrain mb64x1 eager": oom,
                     "pretrain mb16x4 compile": row("compile", None, 65000.0)}, "seq_length": 512}
    report = run_report(tmp_path, train, peer)
    by_row = report["ours_over_peer_by_row"]
    assert by_row["pretrain mb16x4 eager"] == {"bf16": 1.1, "autocast": 55000.0 / 60000.0}
    assert by_row["pretrain mb64x1 eager"] == {"bf16": None}
    entry = next(e for e in report["ours_over_peer"] if e["row"] == "pretrain mb64x1 eager")
    assert entry["peer_oom"] is True and entry["ours_tokens_per_second"] == 70000.0 and entry["ours_over_peer"] is None
    lonely = next(e for e in report["ours_over_peer"] if e["row"] == "pretrain mb16x4 compile")
    assert lonely["ours_row"] is None and lonely["peer_tokens_per_second"] == 65000.0
    table = (tmp_path / "gpu_check.txt").read_text()
    assert "| pretrain mb64x1 eager | bf16 | 70,000 (40.0%; 30.0 GiB) | OOM (out of memory) | - |" in table, table
    assert "| pretrain mb16x4 eager | bf16 | 66,000 (40.0%; 30.0 GiB) | 60,000 (40.0%; 30.0 GiB) | 1.10 |" in table


def test_bad_arguments_are_refused(tmp_path):
    result = run_check(tmp_path, "--only", "everything")
    assert result.returncode == 2 and "--only everything: not a stage" in result.stderr
    assert run_check(tmp_path, "--fast").returncode == 2
    result = run_check(tmp_path, "--all", "--only", "tests")
    assert result.returncode == 2 and "exclude each other" in result.stderr
