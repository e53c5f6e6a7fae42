"""The training loop (pretraining and SFT): read it top to bottom.

    main(argv)
      parse flags -> start torch.distributed -> datasets -> model -> wrap (DeepSpeed)
      -> resume -> loop:  train_step, checkpointer.save, metrics.log, evaluator.maybe_run
      -> final checkpoint

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
import math
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lime.config import LimeConfig
from megatron_lime.data.builder import build_datasets
from megatron_lime.evaluation.in_training import task_evaluator
from megatron_lime.model import LimeModel
from megatron_lime.checkpoint import LoadSource, holds_checkpoint, read_consolidated, resolve_load
from megatron_lime.training.checkpointing import Checkpointer, TrainState, check_model_matches, check_schedule
from megatron_lime.training.config import TrainArgs, parse_training_args, train_iters
from megatron_lime.training.data import MicroBatchSampler, build_loader, dataset_spec, to_device
from megatron_lime.training.failures import TerminationRequest, inject_fault, run_guarded
from megatron_lime.training.metrics import (MetricsLogger, StepMetrics, cpu_owned_memory_gib, peak_memory_gib,
                                            peak_tflops_for)
from megatron_lime.training.schedule import lr_for_config, schedule_record
from megatron_lime.training.wrap import wrap_model


# ----------------------------------------------------------------------------------------------
# Process group


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join the process group the launcher set up (or make a one-process group); NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if "RANK" not in os.environ:  # plain `python ...`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the local ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        if not cuda:
            unlink_deepspeed_cpu_buffer()
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   local_world_size=local_world_size, device=device)


def unlink_deepspeed_cpu_buffer() -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer (CPU runs on one node).

    Why: DeepSpeed's CPU comm op maps a 69 MB /dev/shm file per rank and never unlinks it, so every
    run (and every killed one) leaves 69 MB x ranks of RAM behind until reboot. Once every rank has
    mapped every other rank's buffer (done inside init_distributed; the barrier makes sure), the
    names are no longer needed: the mappings stay valid and the memory is freed when the ranks exit.
    """
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # the ranks span several nodes: DeepSpeed used no shared memory
        pass


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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
    inject_fault("step")
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


# ----------------------------------------------------------------------------------------------
# Validation


class Evaluator:
    """Validation loss and perplexity on the first --eval-iters global batches of the validation set."""

    def __init__(self, dataset, args: TrainArgs, env: DistEnv, metrics: MetricsLogger):
        self.dataset = dataset
        self.interval = args.logging.eval_interval
        self.num_samples = args.logging.eval_iters * args.training.global_batch_size
        self.args = args
        self.env = env
        self.metrics = metrics
        self.last_iteration: int | None = None

    def maybe_run(self, engine, state: TrainState, final: bool = False) -> float | None:
        if self.dataset is None or not self.interval or self.num_samples == 0 or self.last_iteration == state.iteration:
            return None
        if not final and state.iteration % self.interval:
            return None
        with self.metrics.goodput.phase("evaluation"):
            return self.run(engine, state)

    @torch.no_grad()
    def run(self, engine, state: TrainState) -> float:
        sampler = MicroBatchSampler(min(self.num_samples, len(self.dataset)), 0, self.args.training.micro_batch_size,
                                    self.env.rank, self.env.world_size)
        loader = build_loader(self.dataset, sampler, self.args.data.num_workers, self.env.device.type == "cuda")
        engine.eval()
        loss_sum, tokens = 0.0, 0.0
        for batch in loader:
            batch = to_device(batch, self.env.device)
            output = engine(**batch, loss_reduction="sum")
            loss_sum += float(output.loss)
            tokens += float(output.num_loss_tokens)
        engine.train()
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens], self.env.device)
        loss = loss_sum / max(tokens, 1.0)
        perplexity = math.exp(min(loss, 20.0))
        self.metrics.print("-" * 100)
        self.metrics.print(f" validation loss at iteration {state.iteration} | lm loss value: {loss:.6E} | "
                           f"lm loss PPL: {perplexity:.6E} | tokens {int(tokens)}")
        self.metrics.print("-" * 100)
        self.metrics.scalars({"valid/lm_loss": loss, "valid/ppl": perplexity}, state.iteration, state.consumed_tokens)
        self.last_iteration = state.iteration
        return loss


# ----------------------------------------------------------------------------------------------
# Logging window


class Window:
    """Sums over the steps since the last log line; the losses are summed on the device and read once, at the log."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_steps = 0
        self.grad_norm_value: torch.Tensor | float | None = None
        self.skipped = 0

    def add(self, result: StepResult, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        if result.skipped:
            self.skipped += 1
        else:
            self.loss_sum = self.loss_sum + result.mean_loss
            self.loss_steps += 1
            self.grad_norm_value = result.grad_norm_value

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / self.loss_steps if self.loss_steps else float("nan")

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_value is None else float(self.grad_norm_value)


def build_model(config: LimeConfig, seed: int, device: torch.device) -> LimeModel:
    torch.manual_seed(seed)
    with torch.device(device):
        return LimeModel(config)


def load_tokenizer_for(args: TrainArgs, metrics: MetricsLogger):
    """The run's tokenizer with the chat tags (added as new ids when missing, so pretraining and SFT
    size the model alike); grows args.model's vocabulary when the tokenizer needs more rows."""
    from megatron_lime.tokenizer import TokenizerSpec, build_tokenizer, describe_added_chat_tokens

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


def find_load_source(args: TrainArgs, metrics: MetricsLogger) -> LoadSource | None:
    """What --load names; a missing/empty directory starts from scratch (so --load == --save auto-resumes)."""
    path = args.checkpoint.load
    if not path:
        return None
    if not holds_checkpoint(path) and not args.checkpoint.finetune:
        metrics.print(f"WARNING: --load {path} holds no checkpoint yet: starting from scratch")
        return None
    return resolve_load(path, args.checkpoint.universal_checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = parse_training_args(argv)
    env = init_distributed()
    total_iters = train_iters(args)
    gas = args.training.gradient_accumulation_steps(env.world_size)
    metrics = MetricsLogger(env.rank, args.logging.tensorboard_dir, args.logging.wandb_project,
                            args.logging.wandb_exp_name, args.to_dict())
    metrics.show_library_log("megatron_lime.kernels")  # the kernel plan that wrap_model makes
    tokenizer = load_tokenizer_for(args, metrics)
    tokens_per_step = args.training.global_batch_size * args.seq_length
    metrics.print(f"> {args.model.name}: {args.model.num_parameters() / 1e6:.1f}M parameters | "
                  f"{env.world_size} data-parallel ranks on {env.device.type} | micro batch "
                  f"{args.training.micro_batch_size} x accumulation {gas} x {env.world_size} = global batch "
                  f"{args.training.global_batch_size} | {tokens_per_step} tokens/step | {total_iters} steps = "
                  f"{total_iters * tokens_per_step} tokens")

    global_batch = args.training.global_batch_size
    eval_samples = args.logging.eval_iters * global_batch if args.logging.eval_interval else 0
    num_samples = (total_iters * global_batch, eval_samples, eval_samples)
    train_set, valid_set, _ = build_datasets(*dataset_spec(args, num_samples, pad_id=tokenizer.pad_id,
                                                           eod_id=tokenizer.eos_id))
    if train_set is None:
        raise ValueError(f"--data-path {args.data.data_path} with --split {args.data.split} gives no training samples")

    model = build_model(args.model, args.training.seed, env.device)
    source = find_load_source(args, metrics)
    if source is not None and source.meta is not None:
        check_model_matches(source.meta["model"], args.model.to_dict(), f"--load {source.path}")
    schedule = schedule_record(args.optimizer, total_iters)
    check_schedule(source, schedule, args.checkpoint.override_lr_scheduler, args.checkpoint.finetune, metrics.print)
    if source is not None and source.kind == "consolidated":
        state_dict, _ = read_consolidated(source.path)
        model.load_state_dict(state_dict)
        metrics.print(f"> loaded weights from consolidated checkpoint {source.path} (fresh optimizer, step 0)")

    engine, ds_config = wrap_model(model, args, env.device, env.world_size)
    meta_base = {"model": args.model.to_dict(), "tokenizer": tokenizer.path,
                 "data_path": args.data.data_path, "dataset_type": args.data.dataset_type,
                 "world_size": env.world_size, "args": args.to_dict(), "schedule": schedule}
    checkpointer = Checkpointer(args.checkpoint.save, args.checkpoint.save_interval, args.checkpoint.keep_last,
                                meta_base, ds_config, env.rank, env.world_size, goodput=metrics.goodput)
    state = TrainState()
    if source is not None and source.kind == "deepspeed":
        weights_only = args.checkpoint.finetune
        state = checkpointer.resume(engine, source, weights_only, args.checkpoint.universal_checkpoint)
        metrics.print(f"> loaded {os.path.join(source.path, source.tag)}: "
                      + ("weights only (fresh optimizer, step 0)" if weights_only else
                         f"iteration {state.iteration}, consumed samples {state.consumed_samples}"))
    if state.consumed_samples != state.iteration * global_batch:
        raise RuntimeError(f"checkpoint at iteration {state.iteration} has consumed {state.consumed_samples} "
                           f"samples; with --global-batch-size {global_batch} the run would not continue "
                           f"where it stopped (changing the global batch size mid-run is not supported)")

    evaluator = Evaluator(valid_set, args, env, metrics)
    metrics.start_at(state.iteration)  # metrics.jsonl: drop what a resumed run writes again
    task_runs = task_evaluator(args, env, tokenizer, metrics)  # --eval-tasks (lm-eval)
    if state.iteration == 0:  # the starting point (about ln(vocab) from scratch) later validations are read against
        evaluator.maybe_run(engine, state)
    sampler = MicroBatchSampler(total_iters * global_batch, state.consumed_samples,
                                args.training.micro_batch_size, env.rank, env.world_size)
    batches = metrics.goodput.batches(iter(build_loader(train_set, sampler, args.data.num_workers,
                                                        env.device.type == "cuda")))
    termination = TerminationRequest()
    flops_per_token = args.model.flops_per_token(args.seq_length)
    peak = peak_tflops_for(env.device, args.logging.peak_tflops)
    window = Window()
    consecutive_skips = 0
    exit_code = 0
    engine.train()

    while state.iteration < total_iters:
        started = time.perf_counter()
        micro_batches = [to_device(next(batches), env.device) for _ in range(gas)]
        lr = lr_for_config(state.iteration, args.optimizer, total_iters)
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
            metrics.log(window_metrics(window, state, total_iters, lr, tokens_per_step, env, flops_per_token, peak))
            window.reset()
        evaluator.maybe_run(engine, state)
        task_runs.maybe_run(engine, state)

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
        evaluator.maybe_run(engine, state, final=True)
        metrics.print(f"> training done: {state.iteration} steps, {state.consumed_tokens} tokens, "
                      f"{state.skipped_steps} skipped")
    metrics.close()
    dist.barrier()
    return exit_code


def window_metrics(window: Window, state: TrainState, total_iters: int, lr: float, tokens_per_step: int,
                   env: DistEnv, flops_per_token: float, peak: float | None) -> StepMetrics:
    seconds_per_step = window.seconds / max(window.steps, 1)
    memory = peak_memory_gib(env.device)
    return StepMetrics(
        iteration=state.iteration, train_iters=total_iters, consumed_samples=state.consumed_samples,
        consumed_tokens=state.consumed_tokens,
        loss=window.loss,
        lr=lr, grad_norm=window.grad_norm, ms_per_step=1000.0 * seconds_per_step,
        tokens_per_second=tokens_per_step / seconds_per_step, world_size=env.world_size,
        flops_per_token=flops_per_token, peak_tflops=peak,
        memory_gib=memory if memory is not None else cpu_owned_memory_gib(),
        memory_kind="allocated" if memory is not None else "owned",
        skipped_in_window=window.skipped, skipped_total=state.skipped_steps)


if __name__ == "__main__":
    sys.exit(run_guarded(main))
