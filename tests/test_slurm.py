"""The SLURM scripts of examples/slurm/ submitted with `sbatch` to a real one-node SLURM, as users submit them.

tests/slurm/setup_slurm.sh installs slurmctld, slurmd and munge from the distribution's packages when they are
missing (root and apt-get), writes a one-node CPU configuration into this module's temporary folder and starts
the daemons; they are stopped at the end. Only the environment and sbatch's own options adapt the scripts to
the CPU (GPUS_PER_NODE=2, --gpus-per-node=0, --cpus-per-task, --mem); their logic runs unchanged:

  preprocessing  the job array over 2 shards, then the merge with --dependency=afterok: the merged .bin/.idx
                 equal one run of tools/preprocess_data.py over all the files, byte for byte
  pretraining    one node, 2 CPU ranks: trains and saves; `scancel --signal=TERM --batch` mid-run makes it save
                 and end with status 0; resubmitting resumes and ends with the weights of a run never stopped
  failure        a rank that fails ends the job non-zero within 90 s, with that rank's error in the job's log
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_lime.checkpoint import torch_load
from megatron_lime.training.launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(REPO, "tests", "slurm", "setup_slurm.sh")
PREPROCESS = "examples/slurm/preprocess_fineweb_edu.sbatch"
PRETRAIN = "examples/slurm/pretrain_lime_1b.sbatch"
LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss (\S+) \|")
CANNOT_SET_UP = 3  # setup_slurm.sh's status when it may not install the packages (not root, no apt-get)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node SLURM; yields the environment its clients and jobs use."""
    if os.geteuid() != 0:
        pytest.skip("a real SLURM needs root here (slurmd starts jobs as their user; apt-get installs it)")
    if shutil.which("apt-get") is None and not os.path.exists("/usr/sbin/slurmctld"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    from helpers import build_deepspeed_cpu_op

    build_deepspeed_cpu_op()  # once per machine, before any timing: DeepSpeed's CPU all-reduce op
    folder = str(tmp_path_factory.mktemp("slurm"))
    started = subprocess.run(["bash", SETUP, "start", folder], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=600)
    if started.returncode == CANNOT_SET_UP:
        pytest.skip(f"cannot set up SLURM: {started.stdout.strip()[-300:]}")
    assert started.returncode == 0, started.stdout
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launched and not k.startswith("SLURM_")}
    env.update(SLURM_CONF=os.path.join(folder, "slurm.conf"), PATH=f"{env['PATH']}:/usr/sbin",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = os.path.join(folder, "logs")
    os.makedirs(logs)  # SLURM opens a job's --output before the job runs: its folder must exist
    try:
        yield {"env": env, "logs": logs}
    finally:
        subprocess.run(["bash", SETUP, "stop", folder], timeout=60)


def sbatch(slurm, *args: str, **env: str) -> int:
    """Submit from the repository root (as the scripts ask); returns the job id."""
    result = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env={**slurm["env"], **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    return int(result.stdout.strip().split(";")[0])


def job_states(slurm, job: int) -> list[tuple[str, str]]:
    """(JobState, ExitCode) of the job (of each task, for an array), from scontrol."""
    shown = subprocess.run(["scontrol", "show", "job", str(job)], env=slurm["env"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=30).stdout
    return re.findall(r"JobState=(\S+).*?ExitCode=(\S+)", shown, flags=re.S)


def wait_for(slurm, job: int, timeout: float) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(slurm, job)
        if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s, _ in states):
            return states
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)], env=slurm["env"], timeout=30)
    raise AssertionError(f"job {job} not finished after {timeout} s: {job_states(slurm, job)}")


def read_log(path: str) -> str:
    return open(path, encoding="utf-8", errors="replace").read() if os.path.isfile(path) else ""


# ----------------------------------------------------------------------------------------------
# Preprocessing: a job array and a merge


def test_preprocessing_array_and_merge_equal_one_run(slurm, tmp_path):
    from helpers import train_tiny_tokenizer, write_tiny_corpus

    raw = tmp_path / "raw"
    raw.mkdir()
    files = [write_tiny_corpus(str(raw / f"part-{i}.jsonl"), num_docs=60, seed=i) for i in range(4)]
    tokenizer = train_tiny_tokenizer(str(tmp_path / "tokenizer"), files[0])
    shard_dir, merged = str(tmp_path / "shards"), str(tmp_path / "merged" / "fineweb_edu_text_document")
    array = sbatch(slurm, "--array=0-1", "--cpus-per-task=1", "--mem=1G",
                   f"--output={slurm['logs']}/%x-%A_%a.out", PREPROCESS,
                   INPUT=str(raw / "*.jsonl"), TOKENIZER_MODEL=tokenizer, SHARD_DIR=shard_dir, NUM_SHARDS="2")
    merge = sbatch(slurm, f"--dependency=afterok:{array}", "--mem=1G", f"--output={slurm['logs']}/merge-%j.out",
                   "--wrap", f"python tools/merge_datasets.py --input {shard_dir} --output-prefix {merged}")
    # The reference meanwhile: one run over all the files, the same flags as the array's tasks.
    reference = str(tmp_path / "one" / "fineweb_edu")
    one_run = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(raw / "*.jsonl"), "--json-keys", "text",
         "--tokenizer-model", tokenizer, "--append-eod", "--output-prefix", reference,
         "--filter", "language == 'en'", "--filter", "int_score >= 3", "--workers", "1"],
        cwd=REPO, env=slurm["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert one_run.returncode == 0, one_run.stdout
    array_states = wait_for(slurm, array, timeout=240)
    logs = "".join(read_log(p) for p in sorted(glob.glob(f"{slurm['logs']}/*")))
    assert array_states == [("COMPLETED", "0:0")] * 2, logs[-4000:]
    states = wait_for(slurm, merge, timeout=60)
    logs = "".join(read_log(p) for p in sorted(glob.glob(f"{slurm['logs']}/*")))
    assert states == [("COMPLETED", "0:0")], logs[-4000:]
    shards = sorted(os.listdir(shard_dir))
    assert shards == [f"fineweb_edu_CC-MAIN-2025-05_shard{i:05d}-of-00002_text_document.{ext}"
                      for i in range(2) for ext in ("bin", "idx")]
    for ext in ("bin", "idx"):
        with open(f"{merged}.{ext}", "rb") as got, open(f"{reference}_text_document.{ext}", "rb") as want:
            assert got.read() == want.read(), f"merged .{ext} differs from one run over all files"


# ----------------------------------------------------------------------------------------------
# Pretraining: trains and saves, SIGTERM, resume, a failing rank


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import make_tiny_pretraining_data

    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")))


def submit_pretraining(slurm, tiny_data, save: str, *extra_env: tuple[str, str]) -> tuple[int, str]:
    """The pretraining job as a user submits it, for 2 CPU ranks on one node; returns (job id, log path)."""
    prefix, tokenizer = tiny_data
    name = os.path.basename(save)
    log = os.path.join(slurm["logs"], f"{name}-%j.out")
    job = sbatch(slurm, "--gpus-per-node=0", "--cpus-per-task=2", f"--job-name={name}", f"--output={log}", PRETRAIN,
                 "--model", "lime-tiny", "--seq-length", "64", "--train-iters", "100", "--micro-batch-size", "2",
                 "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "50", "--eval-iters", "2",
                 "--save-interval", "50", "--num-workers", "0", "--lr", "3e-3", "--split", "90,10,0",
                 GPUS_PER_NODE="2", DATA_PATH=prefix, TOKENIZER_MODEL=tokenizer, SAVE_DIR=save,
                 MASTER_PORT=str(free_port()), **dict(extra_env))
    return job, log.replace("%j", str(job))


def losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in LOG_LINE.finditer(output)}


def final_weights(save: str) -> dict[str, torch.Tensor]:
    tag = open(os.path.join(save, "latest")).read().strip()
    return torch_load(os.path.join(save, tag, "mp_rank_00_model_states.pt"))["module"]


def ranks_of(save: str) -> list[psutil.Process]:
    """The training ranks of the job whose SAVE_DIR is `save` (their command line: SCRIPT --local_rank=N ...)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (any(a.startswith("--local_rank=") for a in process.info["cmdline"] or [])
                    and process.environ().get("SAVE_DIR") == save):
                found.append(process)
    return found


def test_pretraining_job_trains_saves_stops_on_sigterm_and_resumes(slurm, tiny_data, tmp_path):
    full_save, stopped_save = str(tmp_path / "full"), str(tmp_path / "stopped")
    full_job, full_log = submit_pretraining(slurm, tiny_data, full_save)
    assert wait_for(slurm, full_job, timeout=240) == [("COMPLETED", "0:0")], read_log(full_log)[-4000:]
    full = read_log(full_log)
    assert sorted(losses(full)) == list(range(1, 101)), full[-4000:]
    assert open(os.path.join(full_save, "latest")).read().strip() == "global_step100"
    assert "2 data-parallel ranks on cpu" in full

    job, log = submit_pretraining(slurm, tiny_data, stopped_save)
    ranks: list[psutil.Process] = []
    held = False
    deadline = time.monotonic() + 180
    try:
        while not held and time.monotonic() < deadline:
            if len(ranks) < 2:
                ranks = ranks_of(stopped_save)
            elif max(losses(read_log(log)), default=0) >= 3:
                # Hold the ranks so that the signal lands mid-run however fast this machine steps.
                for rank in ranks:
                    rank.suspend()
                held = True
            time.sleep(0.02)
        assert held, read_log(log)[-4000:]
        subprocess.run(["scancel", "--signal=TERM", "--batch", str(job)], env=slurm["env"], check=True, timeout=30)
        while "[launcher] SIGTERM: forwarded" not in read_log(log) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.resume()
    states = wait_for(slurm, job, timeout=120)
    first = read_log(log)
    assert "SIGTERM: forwarding to the job step" in first, first[-4000:]
    assert "termination signal received" in first, first[-4000:]
    assert re.search(r" goodput \d+\.\d% of [\d:]+ wall, iterations 0 -> \d+ \| steps ", first), first[-4000:]
    assert states == [("COMPLETED", "0:0")], first[-4000:]
    step = int(open(os.path.join(stopped_save, "latest")).read().strip().removeprefix("global_step"))
    assert 3 <= step < 100, first[-4000:]

    job, log = submit_pretraining(slurm, tiny_data, stopped_save)  # the same job again: resumes
    assert wait_for(slurm, job, timeout=240) == [("COMPLETED", "0:0")], read_log(log)[-4000:]
    resumed = read_log(log)
    assert f"iteration {step}, consumed samples {8 * step}" in resumed
    assert {**losses(first), **losses(resumed)} == losses(full)
    want, got = final_weights(full_save), final_weights(stopped_save)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_failing_rank_ends_the_job_with_its_error(slurm, tiny_data, tmp_path):
    save = str(tmp_path / "failing")
    started = time.monotonic()
    job, log = submit_pretraining(slurm, tiny_data, save, ("LIME_FAULT_INJECT", "step:3@1"))
    states = wait_for(slurm, job, timeout=90)
    seconds = time.monotonic() - started
    output = read_log(log)
    assert seconds < 90 and states and states[0][0] == "FAILED" and states[0][1] != "0:0", (states, output[-4000:])
    assert "[rank 1] failed; stopping every rank:" in output, output[-4000:]
    assert "InjectedFault: LIME_FAULT_INJECT=step:3@1: injected fault at step 3" in output, output[-4000:]
