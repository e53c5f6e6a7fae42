"""A run that fails, exits: every rank and the launcher, with a non-zero status, the error printed once.

Faults: an exception in a training step and in a DataLoader worker (LIME_FAULT_INJECT, the test hook of
megatron_lime/training/failures.py), and a full disk during a checkpoint save (a real one: RLIMIT_FSIZE
makes the checkpoint's writes fail with EFBIG). Each with 1 process (`python pretrain_lime.py`) and 2
(`megatron_lime/training/launch.py`). Each run gets 60 s (subprocess timeout); before the fix they never
ended (the DataLoader workers ignored SIGTERM, so the interpreter's exit waited for them forever).
Also: signals outside the loop and repeated signals, workers of a SIGKILLed rank, and the launcher's
rules (stop the others when one rank fails; forward SIGTERM and wait for the ranks).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from megatron_lime.training.launch import free_port, live_processes_in_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = [sys.executable, "-m", "megatron_lime.training.launch"]
DEADLINE_S = 60  # the most a failing run may take to end, from its error on
HANG_S = 900


def clean_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LIME_FAULT_INJECT"):
        env.pop(key, None)
    return {**env, **extra}


def run_bounded(command: list[str], env: dict[str, str], preexec_fn=None, fault_marker: str | None = None):
    """Run in a new session; (returncode, output, processes left in its group).

    Fails if the run is still going DEADLINE_S after its first line containing `fault_marker` (the
    error's report), or after HANG_S in all (start-up alone can take minutes on a loaded 2-core machine).
    """
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, preexec_fn=preexec_fn)
    failed_at, lines = None, []
    killer = threading.Timer(HANG_S, os.killpg, (process.pid, signal.SIGKILL))
    killer.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if failed_at is None and fault_marker is not None and fault_marker in line:
                failed_at = time.monotonic()
                killer.cancel()
                killer = threading.Timer(DEADLINE_S, os.killpg, (process.pid, signal.SIGKILL))
                killer.start()
        process.wait()
    finally:
        killer.cancel()
    output = "".join(lines)
    if process.returncode == -signal.SIGKILL:
        waited = f"{DEADLINE_S} s after its error" if failed_at is not None else f"{HANG_S} s"
        pytest.fail(f"still running {waited} (killed):\n{output[-4000:]}")
    leftovers = live_processes_in_group(process.pid)
    for _ in range(20):  # killed workers may take a moment to be gone
        if not leftovers:
            break
        time.sleep(0.1)
        leftovers = live_processes_in_group(process.pid)
    if leftovers:
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output, leftovers


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import make_tiny_pretraining_data

    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")), num_docs=60)


def training_command(processes: int, tiny_data, save: str, *extra: str) -> list[str]:
    flags = ["--model", "lime-tiny", "--seq-length", "32", "--data-path", tiny_data[0], "--tokenizer-model",
             tiny_data[1], "--train-iters", "20", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--log-interval", "1", "--eval-interval", "0", "--split", "100,0,0", "--no-bf16",
             "--num-workers", "2", "--save", save, "--save-interval", "100", *extra]
    if processes == 1:
        return [sys.executable, "pretrain_lime.py", *flags]
    return [*LAUNCHER, "--nproc-per-node", str(processes), "--master-port", str(free_port()), "pretrain_lime.py",
            *flags]


@pytest.fixture(scope="module")
def deepspeed_cpu_op_built():
    from helpers import build_deepspeed_cpu_op

    build_deepspeed_cpu_op()


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # the checkpoint's shards are larger


FAULTS = {
    # name: (environment, preexec_fn, extra flags, the error's last line; "{last}" is the last rank)
    "step": ({"LIME_FAULT_INJECT": "step:3@{last}"}, None, (),
             "megatron_lime.training.failures.InjectedFault: LIME_FAULT_INJECT=step:3"),
    "worker": ({"LIME_FAULT_INJECT": "worker:3@{last}"}, None, (),
               "InjectedFault: Caught InjectedFault in DataLoader worker process"),
    # One line naming the file and the reason, no traceback (torch's own message named neither).
    "save-disk-full": ({}, limit_file_size, ("--save-interval", "3"),
                       "_states.pt: cannot write the checkpoint: File too large (the file size limit"),
}
FIRST_FAILURE = re.compile(r"^\[rank (\d)\] failed; stopping every rank:$", re.MULTILINE)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failing_run_exits(tiny_data, deepspeed_cpu_op_built, tmp_path, fault, processes):
    environment, preexec_fn, extra, error_line = FAULTS[fault]
    environment = {k: v.format(last=processes - 1) for k, v in environment.items()}
    command = training_command(processes, tiny_data, str(tmp_path / "ckpt"), *extra)
    one_line = fault == "save-disk-full"
    marker = "error: " if one_line else "Traceback"
    returncode, output, leftovers = run_bounded(command, clean_env(**environment), preexec_fn, marker)
    assert returncode == 1, output[-4000:]
    assert not leftovers, f"left running: {leftovers}\n{output[-3000:]}"
    reports = [line for line in output.splitlines() if "] stopped: " not in line]  # others' one-line notes
    assert sum(error_line in line for line in reports) == 1, output[-4000:]
    tracebacks = output.splitlines().count("Traceback (most recent call last):")
    assert tracebacks == 0 if one_line else 1 <= tracebacks <= 2, output[-4000:]  # one report (+ its cause)
    if processes == 2:
        first = FIRST_FAILURE.findall(output)
        assert len(first) == 1 and (fault == "save-disk-full" or first == ["1"]), output[-4000:]
        other = 1 - int(first[0])
        assert f"[rank {other}] stopped: rank {first[0]} failed first" in output \
            or f"[rank {other}] stopped: another rank failed" in output, output[-4000:]


def test_the_deepspeed_launcher_also_stops_every_rank(tiny_data, tmp_path):
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               *training_command(1, tiny_data, str(tmp_path / "ckpt"))[1:]]
    returncode, output, leftovers = run_bounded(command, clean_env(LIME_FAULT_INJECT="step:3@0"), None, "Traceback")
    assert returncode == 1 and not leftovers, output[-4000:]
    assert output.count("InjectedFault: LIME_FAULT_INJECT=step:3@0") == 1
    assert "[rank 0] failed; stopping every rank" in output
    # Rank 1 notes the closed socket in one line, unless DeepSpeed's SIGTERM to the survivors came first.
    assert "[rank 1] stopped: " in output or "[rank 1] SIGTERM while stopping after an error" in output


# ----------------------------------------------------------------------------------------------
# Signals, workers and the launcher, without DeepSpeed (seconds each)

GUARDED = textwrap.dedent("""
    import os, sys, threading
    from megatron_lime.training.failures import TerminationRequest, run_guarded

    def main(argv):
        if argv[0] == "loop":
            TerminationRequest()
        print("ready", flush=True)
        read_fd, _ = os.pipe()
        os.read(read_fd, 1)  # blocks in C, as a collective would: only the signal watcher can end this
        return 0

    sys.exit(run_guarded(main, sys.argv[1:]))
""")


def start_guarded(tmp_path, phase: str) -> subprocess.Popen:
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    process = subprocess.Popen([sys.executable, str(script), phase], cwd=REPO, env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_signal_outside_the_loop_exits_at_once(tmp_path):
    process = start_guarded(tmp_path, "start")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGTERM during start-up: exiting now" in output


def test_in_the_loop_a_repeated_signal_is_one_request_and_a_later_one_exits(tmp_path):
    process = start_guarded(tmp_path, "loop")
    process.send_signal(signal.SIGINT)
    assert "SIGINT: saving a checkpoint after this step" in process.stdout.readline()
    process.send_signal(signal.SIGTERM)  # the same request from another sender (launcher, scheduler)
    time.sleep(2.5)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 128 + signal.SIGTERM and "SIGTERM again: exiting now without saving" in output


WORKERS_OF_A_KILLED_RANK = textwrap.dedent("""
    import os, sys, time
    import torch
    from megatron_lime.training.data import MicroBatchSampler, build_loader

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 1000
        def __getitem__(self, index):
            time.sleep(0.05 if index < 8 else 600)  # soon every worker is busy: torch's watchdog never looks
            return {"input_ids": torch.tensor([index]), "labels": torch.tensor([index])}

    batches = iter(build_loader(Slow(), MicroBatchSampler(1000, 0, 2, 0, 1), num_workers=2, pin_memory=False))
    next(batches)
    print(*[child.pid for child in __import__("multiprocessing").active_children()], flush=True)
    time.sleep(600)
""")


def test_dataloader_workers_die_with_their_rank(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(WORKERS_OF_A_KILLED_RANK)
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                               text=True)
    workers = [int(pid) for pid in process.stdout.readline().split()]
    assert len(workers) == 2
    time.sleep(1)
    process.kill()
    process.wait(timeout=DEADLINE_S)
    for _ in range(100):
        if not any(os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
                   for pid in workers):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"workers {workers} outlived their rank")


RANK_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    mode = sys.argv[-1]
    if mode == "fail":
        if rank == 1:
            sys.exit(3)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank stuck where a signal cannot reach it
        time.sleep(600)
    saved = []
    signal.signal(signal.SIGTERM, lambda *_: saved.append(1))
    os.write(1, f"ready {rank}\\n".encode())  # one write: the two ranks share the pipe
    while not saved:
        time.sleep(0.05)
    time.sleep(3)  # a save longer than any fixed grace period would be in a test
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"saved{rank}"), "w").close()
""")


def test_launcher_stops_the_other_ranks_when_one_fails(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    returncode, output, leftovers = run_bounded([*LAUNCHER, "--nproc-per-node", "2", str(script), "fail"],
                                                clean_env())
    assert returncode == 3 and not leftovers
    assert "rank 1 exited with status 3; stopping the other ranks" in output


def test_launcher_forwards_sigterm_and_waits_for_the_save(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    process = subprocess.Popen([*LAUNCHER, "--nproc-per-node", "2", str(script), "save"], cwd=REPO,
                               env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert {process.stdout.readline().strip() for _ in range(2)} == {"ready 0", "ready 1"}
        process.send_signal(signal.SIGTERM)  # the launcher alone, as `kill PID` or SLURM's --signal=B: does
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()  # its ranks die with it (PR_SET_PDEATHSIG)
    assert process.returncode == 0, output
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()
    assert "SIGTERM: forwarded to the ranks; waiting for them to save and exit" in output
