"""The training loop (pretraining and SFT): read it top to bottom.

    main(argv)
      parse flags -> join the process group (distributed.py) -> datasets -> model -> wrap (wrap.py)
      -> restore what --load names (checkpointing.py) -> loop:  train_step, checkpointer.save,
      metrics.log (metrics.py), evaluators.maybe_run (evaluators.py) -> final checkpoint

Run it through a launcher (`bash examples/pretrain_lime_1b.sh ...`, `deepspeed examples/pretrain_lime_1b.sh ...`)
or, for one process, `python pretrain_lime.py ...`; each runs it as `run_guarded(main)`, which owns how the
process ends (errors, signals, the process group: training/failures.py).

The loss of a step is the mean cross-entropy over every trained token of the global batch:
all micro-batches of all ranks are counted before the first backward pass, each micro-batch
contributes sum(token losses) / global token count, and since DeepSpeed averages gradients
over the R data-parallel ranks, each rank back-propagates R x that (without DeepSpeed's
1 / accumulation scaling). Micro-batches with more trained tokens thus weigh more, as they should.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lime.config import LimeConfig
from megatron_lime.data.builder import build_datasets
from megatron_lime.errors import LimeInputError
from megatron_lime.model import LimeModel
from megatron_lime.tokenizer import TokenizerSpec, build_tokenizer, describe_added_chat_tokens
from megatron_lime.training.checkpointing import Checkpointer, restore
from megatron_lime.training.config import TrainArgs, parse_training_args, train_iters
from megatron_lime.training.data import MicroBatchSampler, build_loader, dataset_spec, to_device
from megatron_lime.training.distributed import init_distributed
from megatron_lime.training.evaluators import build_evaluators
from megatron_lime.training.failures import TerminationRequest, inject_fault, run_guarded
from megatron_lime.training.metrics import MetricsLogger, StepWindow, peak_tflops_for
from megatron_lime.training.schedule import lr_for_config, schedule_record
from megatron_lime.training.wrap import wrap_model


# ----------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    """One optimizer step. The loss, the token count and the gradient norm stay on the device until read: the loop
    reads them at log intervals only, so a step never waits for the GPU on our account."""

    loss_sum: torch.Tensor  # () fp64: summed token losses of the global batch, all ranks
    tokens: torch.Tensor  # () fp64: tokens that carried a target, all ranks
    grad_norm_value: torch.Tensor | float | None  # DeepSpeed's global gradient norm (a tensor or a float)
    skipped: bool  # DeepSpeed did not apply the step: its overflow check found a NaN/inf gradient (a host flag)

    @property
    def mean_loss(self) -> torch.Tensor:
        """() fp64 on the device: the mean over the global batch's trained tokens (nan/inf if the step was skipped)."""
        return self.loss_sum / self.tokens.clamp(min=1.0)

    @property
    def loss(self) -> float:
        return self.mean_loss.item()

    @property
    def trained_tokens(self) -> int:
        return int(self.tokens.item())

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_value is None else float(self.grad_norm_value)


def count_trained_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    weights = (batch["labels"] != -100).float()
    if "loss_mask" in batch:
        weights = weights * batch["loss_mask"].float()
    return weights.sum()


def train_step(engine, micro_batches: list[dict[str, torch.Tensor]], lr: float, device: torch.device) -> StepResult:
    """Forward and backward every micro-batch of this rank, then one optimizer step (DeepSpeed may skip it).

    No host sync of ours: the token count, the loss and the gradient norm stay on the device (StepResult).
    """
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    global_tokens = torch.stack([count_trained_tokens(b) for b in micro_batches]).sum().double()
    dist.all_reduce(global_tokens)
    scale = (engine.dp_world_size / global_tokens.clamp(min=1.0)).float()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        output = engine(**batch, loss_reduction="sum")
        engine.backward(output.loss * scale, scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer only after the last micro-batch
        loss_sum += output.loss.detach().double()
    dist.all_reduce(loss_sum)
    return StepResult(loss_sum=loss_sum, tokens=global_tokens, grad_norm_value=engine.get_global_grad_norm(),
                      skipped=not engine.was_step_applied())


def build_model(config: LimeConfig, seed: int, device: torch.device) -> LimeModel:
    torch.manual_seed(seed)
    with torch.device(device):
        return LimeModel(config)


def load_tokenizer_for(args: TrainArgs, metrics: MetricsLogger):
    """The run's tokenizer with the chat tags (added as new ids when missing, so pretraining and SFT
    size the model alike); grows args.model's vocabulary when the tokenizer needs more rows."""
    data = args.data
    tokenizer = build_tokenizer(TokenizerSpec(tokenizer_type=data.tokenizer_type, tokenizer_model=data.tokenizer_model,
                                              vocab_file=data.vocab_file, merge_file=data.merge_file), chat_tokens=True)
    if describe_added_chat_tokens(tokenizer):
        metrics.print(f"> {describe_added_chat_tokens(tokenizer)}")
    if tokenizer.vocab_size > args.model.vocab_size:
        # As Megatron-LM pads its vocabulary: a multiple of 128 rows.
        rows = -(-tokenizer.vocab_size // 128) * 128
        metrics.print(f"> the model's vocabulary is sized to fit the tokenizer: {args.model.vocab_size} -> {rows} rows "
                      f"({tokenizer.vocab_size} ids, padded to a multiple of 128)")
        args.model = dataclasses.replace(args.model, vocab_size=rows)
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    args = parse_training_args(argv)
    env = init_distributed()
    total_iters = train_iters(args)
    gas = args.training.gradient_accumulation_steps(env.world_size)
    metrics = MetricsLogger(env.rank, args.logging.tensorboard_dir, args.logging.wandb_project,
                            args.logging.wandb_exp_name, args.to_dict())
    metrics.show_library_log("megatron_lime.kernels")  # the kernel plan that wrap_model makes
    tokenizer = load_tokenizer_for(args, metrics)
    global_batch = args.training.global_batch_size
    tokens_per_step = global_batch * args.seq_length
    metrics.print(f"> {args.model.name}: {args.model.num_parameters() / 1e6:.1f}M parameters | "
                  f"{env.world_size} data-parallel ranks on {env.device.type} | micro batch "
                  f"{args.training.micro_batch_size} x accumulation {gas} x {env.world_size} = global batch "
                  f"{global_batch} | {tokens_per_step} tokens/step | {total_iters} steps = "
                  f"{total_iters * tokens_per_step} tokens")
    eval_samples = args.logging.eval_iters * global_batch if args.logging.eval_interval else 0
    num_samples = (total_iters * global_batch, eval_samples, eval_samples)
    train_set, valid_set, _ = build_datasets(*dataset_spec(args, num_samples, pad_id=tokenizer.pad_id,
                                                           eod_id=tokenizer.eos_id))
    if train_set is None:
        raise LimeInputError(f"--data-path {args.data.data_path} with --split {args.data.split} gives no training "
                             "samples")

    engine, ds_config = wrap_model(build_model(args.model, args.training.seed, env.device), args, env.device,
                                   env.world_size)
    schedule = schedule_record(args.optimizer, total_iters)
    meta_base = {"model": args.model.to_dict(), "tokenizer": tokenizer.path, "data_path": args.data.data_path,
                 "dataset_type": args.data.dataset_type, "world_size": env.world_size, "args": args.to_dict(),
                 "schedule": schedule}
    checkpointer = Checkpointer(args.checkpoint.save, args.checkpoint.save_interval, args.checkpoint.keep_last,
                                meta_base, ds_config, env.rank, env.world_size, goodput=metrics.goodput)
    state = restore(engine, checkpointer, args.checkpoint, args.model.to_dict(), schedule, global_batch, metrics.print)
    metrics.start_at(state.iteration)  # metrics.jsonl: drop what a resumed run writes again
    evaluators = build_evaluators(args, env, valid_set, tokenizer, metrics)
    if state.iteration == 0:  # the starting point (about ln(vocab) from scratch) later validations are read against
        evaluators.maybe_run(engine, state)
    sampler = MicroBatchSampler(total_iters * global_batch, state.consumed_samples,
                                args.training.micro_batch_size, env.rank, env.world_size)
    batches = metrics.goodput.batches(iter(build_loader(train_set, sampler, args.data.num_workers,
                                                        env.device.type == "cuda")))
    termination = TerminationRequest()
    window = StepWindow(total_iters, tokens_per_step, env.world_size, args.model.flops_per_token(args.seq_length),
                        peak_tflops_for(env.device, args.logging.peak_tflops), env.device)
    consecutive_skips = 0
    exit_code = 0
    engine.train()

    while state.iteration < total_iters:
        started = time.perf_counter()
        micro_batches = [to_device(next(batches), env.device) for _ in range(gas)]
        lr = lr_for_config(state.iteration, args.optimizer, total_iters)
        inject_fault("step")  # tests only (LIME_FAULT_INJECT); one environment lookup otherwise
        result = train_step(engine, micro_batches, lr, env.device)
        stop = termination.requested(env.device)  # the step's host read: it waits for the GPU, so it is timed with it
        state.iteration += 1
        state.consumed_samples += global_batch
        state.consumed_tokens += tokens_per_step
        state.skipped_steps += int(result.skipped)
        consecutive_skips = consecutive_skips + 1 if result.skipped else 0
        window.add(result, time.perf_counter() - started)
        metrics.goodput.step_done(state.iteration)

        if checkpointer.due(state.iteration):
            checkpointer.save(engine, state)
        if state.iteration % args.logging.log_interval == 0 or state.iteration == total_iters:
            metrics.log(window.close(state, lr))
        evaluators.maybe_run(engine, state)

        if consecutive_skips > args.training.max_skipped:
            path = checkpointer.save(engine, state)
            metrics.print(f"ERROR: {consecutive_skips} consecutive steps had a NaN/inf loss or gradient "
                          f"(--max-skipped {args.training.max_skipped}); stopping at iteration {state.iteration}. "
                          f"The weights are those of the last good step"
                          + (f", saved in {path}." if path else " (no --save given, nothing saved)."))
            exit_code = 1
            break
        if stop:
            path = checkpointer.save(engine, state)
            metrics.print(f"> termination signal received: saved {path} at iteration {state.iteration}, exiting")
            break
        if args.training.exit_interval and state.iteration % args.training.exit_interval == 0:
            checkpointer.save(engine, state)
            metrics.print(f"> --exit-interval reached at iteration {state.iteration}, exiting")
            break
    else:
        checkpointer.save(engine, state)
        evaluators.maybe_run(engine, state, final=True)
        metrics.print(f"> training done: {state.iteration} steps, {state.consumed_tokens} tokens, "
                      f"{state.skipped_steps} skipped")
    metrics.close()
    dist.barrier()
    return exit_code


def train_with_script_flags(script: str, argv: list[str]) -> int:
    """One rank of an example launcher script (examples/pretrain_lime_1b.sh, sft_lime_1b.sh): train with
    the flags its bash arrays hold (`bash SCRIPT --print-args`, NUL-separated), then `argv`, which wins
    because the last occurrence of a flag wins."""
    # The overrides go along, so that the script can leave out what they decide (its --precision, say).
    printed = subprocess.run(["bash", script, "--print-args", *argv], check=True,
                             stdout=subprocess.PIPE).stdout.decode()
    return run_guarded(main, printed.split("\0")[:-1] + argv)


if __name__ == "__main__":
    sys.exit(run_guarded(main))
