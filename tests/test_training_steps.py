"""Single-process runs of the training loop (python, a process group of one): NaN/inf steps are
skipped and stop the run with a checkpoint of the last good state; the bf16 path trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lime.checkpoint import torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the real loop, with the model's training loss turned to NaN after a number of forward passes.
POISONED_RUNNER = '''
import sys
from megatron_lime.model import lime

good_forwards = int(sys.argv[1])
original_forward = lime.LimeModel.forward
calls = [0]

def forward(self, *args, **kwargs):
    output = original_forward(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        if calls[0] > good_forwards:
            output.loss = output.loss * float("nan")
    return output

lime.LimeModel.forward = forward
from megatron_lime.training.failures import run_guarded
from megatron_lime.training.pretrain import main
sys.exit(run_guarded(main, sys.argv[2:]))
'''


def run(tmp_path, good_forwards: int, *args: str) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(POISONED_RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(runner), str(good_forwards), *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)  # a hang guard: bf16 on a loaded CPU is slow


def module_weights(tag_dir) -> dict[str, torch.Tensor]:
    return torch_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))["module"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import make_tiny_pretraining_data

    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")), num_docs=60)


def flags(tiny_data, save: str, *extra: str) -> list[str]:
    return ["--model", "lime-tiny", "--seq-length", "32", "--data-path", tiny_data[0], "--tokenizer-model",
            tiny_data[1], "--save", save, "--train-iters", "20", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0", "--split", "100,0,0", *extra]


@pytest.mark.parametrize("precision", ["--no-bf16", "--bf16", "--precision=autocast"])
def test_nan_steps_are_skipped_then_the_run_stops_with_the_last_good_state(tmp_path, tiny_data, precision):
    good = str(tmp_path / "good")
    reference = run(tmp_path, 10**9, *flags(tiny_data, good, precision, "--exit-interval", "5"))
    assert reference.returncode == 0, reference.stdout[-4000:]
    poisoned_dir = str(tmp_path / "poisoned")
    # 2 micro-batches per step: 10 good forwards = 5 good steps, then every loss is NaN.
    poisoned = run(tmp_path, 10, *flags(tiny_data, poisoned_dir, precision, "--max-skipped", "2"))
    assert poisoned.returncode == 1, poisoned.stdout[-4000:]
    output = poisoned.stdout
    assert "skipped 1 (total 1)" in output and "skipped 1 (total 3)" in output
    assert ("ERROR: 3 consecutive steps had a NaN/inf loss or gradient (--max-skipped 2); stopping at iteration 8"
            in output)
    assert open(os.path.join(poisoned_dir, "latest")).read().strip() == "global_step8"
    meta = json.load(open(os.path.join(poisoned_dir, "global_step8", "lime_config.json")))
    assert meta["skipped_steps"] == 3 and meta["consumed_samples"] == 32
    last_good = module_weights(os.path.join(good, "global_step5"))
    stopped = module_weights(os.path.join(poisoned_dir, "global_step8"))
    for name, tensor in last_good.items():
        assert torch.equal(tensor, stopped[name]), f"{name} changed during skipped steps"


def test_bf16_path_trains_with_fp32_master_weights(tmp_path, tiny_data):
    save = str(tmp_path / "bf16")
    result = run(tmp_path, 10**9, *flags(tiny_data, save, "--bf16", "--train-iters", "4", "--lr", "3e-3"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "skipped 0 (total 0)" in result.stdout and "lm loss nan" not in result.stdout
    assert json.load(open(os.path.join(save, "global_step4", "ds_config.json")))["bf16"]["enabled"] is True
    weights = module_weights(os.path.join(save, "global_step4"))
    assert weights["layers.0.mlp.fc_in.weight"].dtype == torch.bfloat16
    # bf16 with ZeRO-1 is DeepSpeed's BF16_Optimizer: fp32 master weights and fp32 gradient accumulation.
    optimizer_state = torch_load(os.path.join(save, "global_step4", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
                                 )["optimizer_state_dict"]
    masters = optimizer_state["single_partition_of_fp32_groups"]
    assert all(master.dtype == torch.float32 for master in masters)
    # The loop's schedule reached the optimizer: the LR of the last step (index 3) of a 4-step run.
    from megatron_lime.training.config import OptimizerConfig
    from megatron_lime.training.schedule import lr_for_config

    expected_lr = lr_for_config(3, OptimizerConfig(lr=3e-3, min_lr=5e-6, lr_warmup_fraction=0.05), 4)
    groups = optimizer_state["base_optimizer_state"]["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(expected_lr)] * 2
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[0]["betas"] == (0.9, 0.95)
