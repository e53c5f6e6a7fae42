"""The GPU-only paths of a training step, run on the CPU through their switches.

- The kernel plan (ours or PyTorch's RMSNorm/SiLU per shape) is made once in wrap_model, before step 1, from a
  recording forward: LIME_KERNEL_CHOICE_DEVICES=cpu makes a CPU run take it, so a run with
  --recompute-activations proves nothing is timed inside an activation checkpoint's recomputation (that crashed
  the first step with "CheckpointError: Recomputed values ... different metadata" when the timing ran inside
  the forward).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import make_tiny_pretraining_data, train_tiny
from megatron_lime.model.linear import Linear
from op_log import OpLog


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


# ---- in this process: DeepSpeed engines on a process group of one (gloo), measured once for the tests below ----

RECIPE_DS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                "ds_config_zero1_bf16.json")


def engine_for(env, *flags: str):
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.pretrain import build_model
    from megatron_lime.training.wrap import wrap_model

    args = parse_training_args(["--model", "lime-tiny", "--seq-length", "32", "--train-iters", "10",
                                "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
                                "--lr-warmup-iters", "0", *flags])
    model = build_model(args.model, args.training.seed, env.device)
    engine, _ = wrap_model(model, args, env.device, 1)
    return engine, args


def batches(vocab: int, count: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, vocab, (2, 33), generator=g) for _ in range(count)]
    return [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]


VIEWS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand",
         "aten.as_strided", "aten.slice", "aten.select", "aten.detach", "aten.alias", "aten.narrow", "aten.split",
         "aten.unbind", "aten.squeeze", "aten.unsqueeze", "aten.reshape"}  # no kernel of their own


def optimizer_step_ops(env, num_layers: int, *flags: str) -> tuple[list[str], float]:
    """The non-view ops of one DeepSpeed optimizer step (the step at the accumulation boundary), and its norm."""
    from megatron_lime.training.pretrain import train_step

    engine, args = engine_for(env, "--num-layers", str(num_layers), *flags)
    counted: list[list[str]] = []
    real_step = engine.optimizer.step

    def step(*a, **k):
        with OpLog() as log:
            result = real_step(*a, **k)
        counted.append([op for op, _ in log.ops if op not in VIEWS])
        return result

    engine.optimizer.step = step
    result = train_step(engine, batches(args.model.vocab_size), 1e-3, env.device)
    assert len(counted) == 1 and not result.skipped
    return counted[0], result.grad_norm


def plain_autocast_run(env, steps: int) -> tuple[list[float], list[float]]:
    """What a user writes: fp32 weights, forward and loss under torch.autocast(bf16), backward, clip, AdamW."""
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.pretrain import build_model, count_trained_tokens
    from megatron_lime.training.wrap import build_optimizer

    args = parse_training_args(["--model", "lime-tiny", "--seq-length", "32", "--train-iters", "10",
                                "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3"])
    model = build_model(args.model, args.training.seed, env.device)
    optimizer = build_optimizer(model, args, env.device)
    losses, norms = [], []
    for step in range(steps):
        micro = batches(args.model.vocab_size, seed=step)
        total = sum(count_trained_tokens(b) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            with torch.autocast(env.device.type, dtype=torch.bfloat16):
                loss = model(**batch, loss_reduction="sum").loss
            (loss / total).backward()
            loss_sum += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.training.clip_grad).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / total.item())
    return losses, norms


def engine_run(env, steps: int, *flags: str, fused: bool = True) -> tuple[list[float], list[float], object]:
    from megatron_lime.training.pretrain import train_step

    engine, args = engine_for(env, *flags)
    if not fused:
        for module in engine.module.modules():
            if isinstance(module, Linear):
                module.accumulate_weight_grad = False
    losses, norms = [], []
    for step in range(steps):
        result = train_step(engine, batches(args.model.vocab_size, seed=step), 1e-3, env.device)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return losses, norms, engine


@pytest.fixture(scope="module")
def measured():
    """Everything the tests below check, measured with one process group (conftest destroys groups after each test,
    and DeepSpeed caches its groups: so the engines are all built here, once)."""
    import torch.distributed as dist

    from megatron_lime.training.launch import free_port
    from megatron_lime.training.distributed import init_distributed
    from megatron_lime.training.pretrain import build_model, count_trained_tokens

    assert not dist.is_initialized()
    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    results: dict = {}
    engines = []  # kept alive: a collected engine's optimizer tears down DeepSpeed's process groups
    try:
        env = init_distributed()
        for precision in ("fp32", "bf16"):
            for layers in (1, 3):
                results["ops", precision, layers] = optimizer_step_ops(env, layers, "--precision", precision)[0]
        _, results["fused_norm"] = optimizer_step_ops(env, 2, "--precision", "fp32", "--clip-grad", "0")
        engine, args = engine_for(env, "--num-layers", "2", "--precision", "fp32")
        engines.append(engine)
        model = build_model(args.model, args.training.seed, env.device)
        micro = batches(args.model.vocab_size)
        total = sum(count_trained_tokens(b) for b in micro)
        for batch in micro:
            (model(**batch, loss_reduction="sum").loss / total).backward()
        results["reference_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        results["plain_autocast"] = plain_autocast_run(env, 3)
        *results["engine_autocast"], engine = engine_run(env, 3, "--precision", "autocast")
        engines.append(engine)
        results["autocast_weight_dtypes"] = {p.dtype for p in engine.module.parameters()}
        recipe, _ = engine_for(env, "--precision", "bf16", "--deepspeed-config", RECIPE_DS_CONFIG)
        engines.append(recipe)
        results["recipe_overlap_comm"] = recipe.optimizer.overlap_comm
        results["recipe_fused_accumulation"] = {m.accumulate_weight_grad for m in recipe.module.modules()
                                                if isinstance(m, Linear)}
        for fused in (True, False):  # fp32: the fused weight-gradient accumulation against autograd's
            *results["fused", fused], engine = engine_run(env, 3, "--precision", "fp32", fused=fused)
            engines.append(engine)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    return results


def test_the_recipe_deepspeed_config_adds_no_per_parameter_hooks(measured):
    """The recipe's DeepSpeed JSON: overlap_comm off (on, ZeRO-1/2 hooks every parameter's gradient in every
    micro-batch and synchronises the device in every step: nothing to overlap on one node's NVLink with gradient
    accumulation, as wrap.py explains)."""
    assert json.load(open(RECIPE_DS_CONFIG))["zero_optimization"]["overlap_comm"] is False
    assert measured["recipe_overlap_comm"] is False


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_deepspeed_step_costs_the_same_kernels_whatever_the_parameter_count(measured, precision):
    """DeepSpeed's own step ran a cast to fp64 and a norm per parameter and an amax and an amin per gradient: 15 ops
    per parameter in bf16 mode, 2 in fp32 (two more layers, 12 parameters, added 180 and 24). Fused
    (wrap.fuse_norm_and_overflow_check): one multi-tensor norm, so they add fewer than one op per parameter."""
    one, three = measured["ops", precision, 1], measured["ops", precision, 3]
    assert len(three) - len(one) < 12, (sorted(set(three)), len(one), len(three))
    assert "aten._foreach_norm" in one and "aten.amax" not in one and "aten.linalg_vector_norm" not in one


def test_the_fused_norm_is_the_global_gradient_norm(measured):
    """The norm DeepSpeed logs and clips with equals torch's clip_grad_norm_ over the same gradients."""
    assert measured["fused_norm"] == pytest.approx(measured["reference_norm"], rel=1e-5)


def test_autocast_precision_equals_a_plain_torch_autocast_loop(measured):
    """--precision autocast (DeepSpeed's torch_autocast: fp32 weights, bf16 compute) trains as a plain
    torch.autocast loop does: the same losses and gradient norms, step after step (the weights' bf16 copies, kept
    over a step's micro-batches, are made again after every update)."""
    plain_losses, plain_norms = measured["plain_autocast"]
    losses, norms = measured["engine_autocast"]
    assert measured["autocast_weight_dtypes"] == {torch.float32}
    assert losses[0] == pytest.approx(plain_losses[0], rel=1e-6)
    # (a stale bf16 copy of a weight, kept past an optimizer step, moves the later losses by about 1e-4)
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert norms == pytest.approx(plain_norms, rel=1e-4)


# The real loop, with the step's host read (the termination poll, an all-reduce and .item()) made to take 0.25 s,
# as waiting for a GPU's queued work does.
SLOW_POLL_RUNNER = """
import sys
import time
from megatron_lime.training import failures

real = failures.TerminationRequest.requested

def requested(self, device):
    time.sleep(0.25)
    return real(self, device)

failures.TerminationRequest.requested = requested
from megatron_lime.training.pretrain import main
sys.exit(failures.run_guarded(main, sys.argv[1:]))
"""


def test_the_logged_step_time_includes_the_steps_host_read(tiny_data, tmp_path):
    """ms_per_step (and so tokens/s and MFU) covers the termination poll's .item(), where the host waits for the
    GPU to finish the step: stopping the clock before it made GPU runs read up to 7% fast."""
    import subprocess
    import sys

    runner = tmp_path / "runner.py"
    runner.write_text(SLOW_POLL_RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    save = tmp_path / "ckpt"
    flags = ["--model", "lime-tiny", "--seq-length", "32", "--num-layers", "1", "--data-path", tiny_data[0],
             "--tokenizer-model", tiny_data[1], "--save", str(save), "--train-iters", "3", "--micro-batch-size", "2",
             "--global-batch-size", "2", "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0",
             "--split", "100,0,0"]
    run = subprocess.run([sys.executable, str(runner), *flags], cwd=os.path.dirname(os.path.dirname(__file__)),
                         env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steps = [r["ms_per_step"] for r in records if r.get("kind") == "train"]
    assert len(steps) == 3 and min(steps) >= 250, steps


def test_the_linear_layers_accumulate_their_weight_gradients_in_their_gemms(measured):
    """wrap_model switches the fused weight-gradient accumulation on for the recipe's configuration (ZeRO-1, no
    gradient hooks), and it trains as autograd's accumulation does (three steps of two micro-batches, fp32)."""
    assert measured["recipe_fused_accumulation"] == {True}
    fused_losses, fused_norms = measured["fused", True]
    losses, norms = measured["fused", False]
    assert fused_losses == pytest.approx(losses, rel=1e-5) and fused_norms == pytest.approx(norms, rel=1e-4)
