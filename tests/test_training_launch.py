"""Real launches of examples/pretrain_lime_1b.sh on CPU (gloo) with lime-tiny on a corpus made here.

One module-scoped set of runs, several assertions each (DeepSpeed start-up is the slow part):
  full     bash examples/pretrain_lime_1b.sh        2 processes (our launcher), 20 steps, uninterrupted
  first    deepspeed --num_gpus 2 examples/...       same flags, stops at step 10 (--exit-interval)
  resumed  deepspeed --num_gpus 2 examples/...       resumes `first` to step 20: equal to `full`, bitwise
  single   deepspeed --num_gpus 1 examples/...       resumes `first` (universal checkpoint) at world size 1
  sigterm  deepspeed --num_gpus 2 examples/...       a long run stopped by SIGTERM to the process group
  preempt  bash examples/pretrain_lime_1b.sh         SIGTERM to the command alone mid-run (our launcher: it
           deepspeed --num_gpus 2 examples/...       waits for the save; DeepSpeed's runner: dies, the ranks
                                                     notice and save); resuming reproduces `full`
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from megatron_lime.training.launch import free_port

from megatron_lime.checkpoint import torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "pretrain_lime_1b.sh")
LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss (\S+) \| lr (\S+) \| grad norm (\S+) \|")


def cpu_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    return {**env, **extra}  # MASTER_PORT given here is kept: the bash form's default 29500 may be taken


def overrides(data, save: str, load: str, *extra: str) -> list[str]:
    prefix, tokenizer = data
    return ["--model", "lime-tiny", "--seq-length", "64", "--data-path", prefix, "--tokenizer-model", tokenizer,
            "--save", save, "--load", load, "--train-iters", "20", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "2",
            "--save-interval", "10", "--num-workers", "0", "--lr", "3e-3", "--split", "90,10,0",
            "--tensorboard-dir", os.path.join(save, "tb"), *extra]


def launch(command: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=timeout)
    return result


def deepspeed_command(num_processes: int, *args: str) -> list[str]:
    return ["deepspeed", "--num_gpus", str(num_processes), "--master_port", str(free_port()), SCRIPT, *args]


def losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in LOG_LINE.finditer(output)}


def module_weights(tag_dir: str) -> dict[str, torch.Tensor]:
    return torch_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))["module"]


def check(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-6000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import make_tiny_pretraining_data

    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    full_dir, first_dir = str(root / "full"), str(root / "first")
    full_port = free_port()
    full = check(launch(["bash", SCRIPT, *overrides(tiny_data, full_dir, full_dir)],
                        cpu_env(MASTER_PORT=str(full_port), CPU_PROCESSES="2")), "bash form")
    first = check(launch(deepspeed_command(2, *overrides(tiny_data, first_dir, first_dir, "--exit-interval", "10")),
                         cpu_env()), "first half")
    resumed_dir = str(root / "resumed")
    subprocess.run(["cp", "-r", first_dir, resumed_dir], check=True)
    resumed = check(launch(deepspeed_command(2, *overrides(tiny_data, resumed_dir, resumed_dir)), cpu_env()),
                    "resume")
    return dict(full=full, full_dir=full_dir, full_port=full_port, first=first, first_dir=first_dir, resumed=resumed,
                resumed_dir=resumed_dir, root=root)


def test_two_process_run_trains_and_logs(runs):
    output = runs["full"]
    per_step = losses(output)
    assert sorted(per_step) == list(range(1, 21))
    assert sum(per_step[i] for i in range(16, 21)) / 5 < sum(per_step[i] for i in range(1, 6)) / 5 - 0.5
    assert "2 data-parallel ranks on cpu" in output
    assert "micro batch 2 x accumulation 2 x 2 = global batch 8" in output
    line = next(text for text in output.splitlines() if "iteration       20/" in text)
    for field in ("consumed samples          160", "consumed tokens          10240", "tokens/s", "/device)",
                  "TFLOP/s/device", "MFU n/a on CPU", "peak memory", "ms/step"):
        assert field in line, field
    assert len(re.findall(r"validation loss at iteration (10|20) \| lm loss value: \S+ \| lm loss PPL", output)) == 2
    assert os.listdir(os.path.join(runs["full_dir"], "tb"))


def test_a_cpu_run_leaves_no_shared_memory_behind(runs):
    # DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and never removes it;
    # init_distributed unlinks the names once every rank has mapped them.
    assert "2 data-parallel ranks on cpu" in runs["full"]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{runs['full_port']}_*")


def test_checkpoint_layout_and_contract(runs):
    save = runs["full_dir"]
    assert open(os.path.join(save, "latest")).read().strip() == "global_step20"
    tag_dir = os.path.join(save, "global_step20")
    meta = json.load(open(os.path.join(tag_dir, "lime_config.json")))
    assert meta["iteration"] == 20 and meta["consumed_samples"] == 160 and meta["consumed_tokens"] == 160 * 64
    assert meta["model"]["num_layers"] == 2 and meta["model"]["max_position_embeddings"] == 64
    assert meta["dataset_type"] == "gpt" and meta["world_size"] == 2 and meta["data_path"]
    assert meta["args"]["training"]["global_batch_size"] == 8 and meta["tokenizer"]
    ds_config = json.load(open(os.path.join(tag_dir, "ds_config.json")))
    assert ds_config["train_batch_size"] == 8 and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["zero_optimization"]["stage"] == 1 and ds_config["bf16"]["enabled"] is False
    assert {f"rng_state_rank{r}.pt" for r in range(2)} <= set(os.listdir(tag_dir))
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= set(os.listdir(tag_dir))
    assert os.path.isdir(os.path.join(save, "global_step10"))
    weights = module_weights(tag_dir)
    assert "tok_embeddings.weight" in weights and "position_table" not in weights


def test_stop_and_resume_reproduces_the_uninterrupted_run(runs):
    first, resumed, full = losses(runs["first"]), losses(runs["resumed"]), losses(runs["full"])
    assert sorted(first) == list(range(1, 11)) and sorted(resumed) == list(range(11, 21))
    assert "loaded" in runs["resumed"] and "iteration 10, consumed samples 80" in runs["resumed"]
    assert {**first, **resumed} == full
    final_full = module_weights(os.path.join(runs["full_dir"], "global_step20"))
    final_resumed = module_weights(os.path.join(runs["resumed_dir"], "global_step20"))
    for name, tensor in final_full.items():
        assert torch.equal(tensor, final_resumed[name]), f"{name} differs after resume"


def test_resume_at_another_data_parallel_size(runs, tiny_data):
    first_dir = os.path.join(runs["root"], "universal")
    subprocess.run(["cp", "-r", runs["first_dir"], first_dir], check=True)
    tag_dir = os.path.join(first_dir, "global_step10")
    refused = launch(deepspeed_command(1, *overrides(tiny_data, first_dir, first_dir)), cpu_env())
    assert refused.returncode != 0 and "saved with data-parallel size 2, this run has 1" in refused.stdout
    convert = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                              "--input_folder", tag_dir, "--output_folder", tag_dir + "_universal"],
                             env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert convert.returncode == 0, convert.stdout[-4000:]
    single = check(launch(deepspeed_command(1, *overrides(tiny_data, first_dir, first_dir, "--universal-checkpoint")),
                          cpu_env()), "world size 1 resume")
    assert "1 data-parallel ranks" in single and "accumulation 4 x 1" in single
    resumed, full = losses(single), losses(runs["full"])
    assert sorted(resumed) == list(range(11, 21))
    for step in resumed:  # same samples, same math; only the order of the reductions differs
        assert resumed[step] == pytest.approx(full[step], rel=2e-5, abs=0), step


def test_sigterm_saves_a_checkpoint(tiny_data, tmp_path):
    save = str(tmp_path / "preempted")
    args = overrides(tiny_data, save, save, "--train-iters", "100000", "--save-interval", "100000",
                     "--eval-interval", "0")
    # Its own process group, signalled as a whole: what SLURM's preemption or a Ctrl-C in a terminal does.
    process = subprocess.Popen(deepspeed_command(2, *args), env=cpu_env(), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 180
    for line in process.stdout:
        lines.append(line)
        if LOG_LINE.search(line) and int(LOG_LINE.search(line).group(1)) >= 3:
            os.killpg(process.pid, signal.SIGTERM)
            break
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("no third log line within 180 s:\n" + "".join(lines[-50:]))
    try:
        rest, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    output = "".join(lines) + rest
    assert "termination signal received" in output, output[-4000:]
    tag = open(os.path.join(save, "latest")).read().strip()
    step = int(tag.removeprefix("global_step"))
    assert 3 <= step < 100000
    meta = json.load(open(os.path.join(save, tag, "lime_config.json")))
    assert meta["iteration"] == step and meta["consumed_samples"] == 8 * step


@pytest.mark.parametrize("form", ["bash", "deepspeed"])
def test_sigterm_to_the_launcher_completes_the_checkpoint_and_the_resumed_run_matches(runs, tiny_data, tmp_path, form):
    """SIGTERM to the command alone (`kill PID`, `timeout`, SLURM's B: signal), not to its process group.

    bash form: our launcher forwards it and waits for the save, then exits 0. deepspeed form: DeepSpeed's
    runner dies at once (-15, its own behaviour); the ranks notice it is gone, save and exit, and
    DeepSpeed's per-node launcher with them. Either way the checkpoint is complete and resuming
    reproduces the uninterrupted run.
    """
    import psutil

    save = str(tmp_path / "preempted")
    if form == "bash":
        command, env = ["bash", SCRIPT, *overrides(tiny_data, save, save)], cpu_env(CPU_PROCESSES="2")
    else:
        command, env = deepspeed_command(2, *overrides(tiny_data, save, save)), cpu_env()
    process = subprocess.Popen(command, env={**env, "MASTER_PORT": str(free_port())}, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, ranks, launcher, held = [], [], None, False
    try:
        for line in process.stdout:
            lines.append(line)
            if not ranks and LOG_LINE.search(line) and int(LOG_LINE.search(line).group(1)) >= 3:
                # Hold the ranks so that the signal lands mid-run however fast this machine steps,
                # then signal the command alone (bash exec'd our launcher; deepspeed is DeepSpeed's runner).
                launcher = psutil.Process(process.pid)
                if form == "deepspeed":
                    launcher = launcher.children()[0]  # deepspeed.launcher.launch
                ranks = launcher.children()
                for rank in ranks:
                    rank.suspend()
                held = True
                process.send_signal(signal.SIGTERM)
                if form == "deepspeed":
                    assert process.wait(timeout=30) == -signal.SIGTERM  # DeepSpeed's runner: gone at once
            if held and (form == "deepspeed" or "[launcher] SIGTERM: forwarded" in line):
                for rank in ranks:
                    rank.resume()
                held = False
        _, alive = psutil.wait_procs([launcher, *ranks], timeout=120)
        assert not alive, f"still running 120 s after the signal: {alive}"
        process.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a failed assertion leaves nothing running
    first = "".join(lines)
    assert "termination signal received" in first, first[-4000:]
    if form == "bash":
        assert process.returncode == 0, first[-4000:]
    else:
        assert "has ended without stopping its ranks (SIGTERM to it alone?): saving a checkpoint" in first
    tag = open(os.path.join(save, "latest")).read().strip()
    step = int(tag.removeprefix("global_step"))
    assert 3 <= step < 20, first[-4000:]
    tag_dir = os.path.join(save, tag)
    assert json.load(open(os.path.join(tag_dir, "lime_config.json")))["iteration"] == step
    assert {"mp_rank_00_model_states.pt", "rng_state_rank0.pt", "rng_state_rank1.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
                os.listdir(tag_dir))
    if form == "deepspeed":
        command = deepspeed_command(2, *overrides(tiny_data, save, save))  # a fresh port
    resumed = check(launch(command, {**env, "MASTER_PORT": str(free_port())}), "resume")
    assert f"iteration {step}, consumed samples {8 * step}" in resumed
    assert sorted(losses(first)) == list(range(1, step + 1)) and sorted(losses(resumed)) == list(range(step + 1, 21))
    assert {**losses(first), **losses(resumed)} == losses(runs["full"])


@pytest.fixture(scope="module")
def tiny_sft_data(tiny_data, tmp_path_factory):
    """~300 dolly-schema examples, preprocessed with the pretraining run's tokenizer (seq 64)."""
    from helpers import tiny_sft_dataset

    return tiny_sft_dataset(str(tmp_path_factory.mktemp("sft")), tiny_data[1], 64, "over_length: truncate")


def test_sft_script_finetunes_from_consolidated_weights(runs, tiny_data, tiny_sft_data, tmp_path):
    from megatron_lime.config import LimeConfig
    from megatron_lime.model import LimeModel
    from megatron_lime.checkpoint import write_consolidated as save_consolidated

    pretrained_meta = json.load(open(os.path.join(runs["full_dir"], "global_step20", "lime_config.json")))
    model = LimeModel(LimeConfig.from_dict(pretrained_meta["model"]))
    model.load_state_dict(module_weights(os.path.join(runs["full_dir"], "global_step20")))
    consolidated = str(tmp_path / "consolidated")
    save_consolidated(consolidated, model, {"model": pretrained_meta["model"]})
    save = str(tmp_path / "sft")
    env = cpu_env(MASTER_PORT=str(free_port()), CPU_PROCESSES="2", PRETRAINED=consolidated, SAVE_DIR=save,
                  DATA_PATH=tiny_sft_data, TOKENIZER_MODEL=tiny_data[1], SFT_ITERS="6")
    output = check(launch(["bash", os.path.join(REPO, "examples", "sft_lime_1b.sh"), "--model", "lime-tiny",
                           "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
                           "--log-interval", "1", "--eval-interval", "6", "--eval-iters", "1", "--num-workers", "1",
                           "--split", "90,10,0"], env), "sft script")
    assert f"loaded weights from consolidated checkpoint {consolidated}" in output
    per_step = losses(output)
    assert sorted(per_step) == list(range(1, 7))
    # From scratch the first loss is about ln(512) = 6.24; the pretrained weights already know the text. Every step:
    # the weights are loaded after DeepSpeed's wrap, so its fp32 master copy must be refreshed from them, or the
    # first optimizer step would bring the random initialisation back.
    assert max(per_step.values()) < 5.9, per_step
    meta = json.load(open(os.path.join(save, "global_step6", "lime_config.json")))
    assert meta["dataset_type"] == "sft" and meta["iteration"] == 6
    assert meta["args"]["optimizer"]["lr"] == 8e-5 and meta["args"]["optimizer"]["lr_warmup_fraction"] == 0.1
