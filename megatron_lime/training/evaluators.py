"""What the loop evaluates while it trains, behind one seam: `maybe_run(engine, state, final=False)`.

    ValidationLoss   loss and perplexity on the first --eval-iters global batches of the validation set
    TaskScores       lm-eval tasks scored on the live model (--eval-tasks), every rank taking a share
    build_evaluators(args, env, valid_set, tokenizer, metrics) -> Evaluators (both, from the run's flags)

The loop calls `evaluators.maybe_run(engine, state)` before the first step of a run from scratch (the starting
point later validations are read against), after every step, and with `final=True` after the last one. Each
evaluator decides whether it is due, runs under the goodput's "evaluation" phase, logs its figures through
training/metrics.py, and never runs twice at one iteration. Each takes what it needs as arguments;
build_evaluators reads them from the typed flags.

Task scores leave training exactly as it was: the model goes back to train mode, and every random generator
(python, numpy, torch, CUDA), which lm-eval reseeds, is restored with the snapshot a checkpoint saves
(checkpointing.rng_state), so the training losses are the same with and without them (tests/test_evaluation.py).
lm-eval gives each rank every world_size-th document and gathers the per-sample results on rank 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_lime.training.checkpointing import TrainState, rng_state, set_rng_state
from megatron_lime.training.config import TrainArgs
from megatron_lime.training.data import MicroBatchSampler, build_loader, to_device
from megatron_lime.training.distributed import DistEnv, all_reduce_sum
from megatron_lime.training.metrics import MetricsLogger


@dataclass(kw_only=True)
class PeriodicEvaluator:
    """Runs every `interval` steps; the subclasses say what runs (`run`) and when else (`due`)."""

    interval: int  # steps between runs; 0: never
    metrics: MetricsLogger
    last_iteration: int | None = field(default=None, init=False)

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def due(self, state: TrainState, final: bool) -> bool:
        return final or state.iteration % self.interval == 0

    def maybe_run(self, engine, state: TrainState, final: bool = False) -> Any:
        if not self.enabled or self.last_iteration == state.iteration or not self.due(state, final):
            return None
        with self.metrics.goodput.phase("evaluation"):
            result = self.run(engine, state)
        self.last_iteration = state.iteration
        return result

    def run(self, engine, state: TrainState) -> Any:
        raise NotImplementedError


@dataclass(kw_only=True)
class ValidationLoss(PeriodicEvaluator):
    """Loss and perplexity over the first `num_samples` samples of `dataset`, shared out over the ranks; also
    before the first step and after the last."""

    dataset: Any  # the validation split (None: never runs)
    num_samples: int  # --eval-iters x the global batch
    micro_batch_size: int
    num_workers: int  # DataLoader workers
    env: DistEnv

    @property
    def enabled(self) -> bool:
        return self.dataset is not None and self.interval > 0 and self.num_samples > 0

    @torch.no_grad()
    def run(self, engine, state: TrainState) -> float:
        sampler = MicroBatchSampler(min(self.num_samples, len(self.dataset)), 0, self.micro_batch_size,
                                    self.env.rank, self.env.world_size)
        loader = build_loader(self.dataset, sampler, self.num_workers, self.env.device.type == "cuda")
        engine.eval()
        loss_sum, tokens = 0.0, 0.0
        for batch in loader:
            output = engine(**to_device(batch, self.env.device), loss_reduction="sum")
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
        return loss


@dataclass(kw_only=True)
class TaskScores(PeriodicEvaluator):
    """lm-eval `tasks` on the live model every `interval` steps (not before the first: an untrained model's
    scores are chance)."""

    tasks: list[str]  # lm-eval task or group names; empty: never runs
    limit: float | None  # at most this many documents per task (a fraction < 1 takes that share)
    data_dir: str | None  # offline task data: DIR/<hub dataset id>/
    batch_size: int  # requests per forward pass
    tokenizer: Any  # the run's megatron_lime tokenizer
    device: str
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.tasks:  # fail at start-up, not after hours of training, when lm-eval is missing
            try:
                import lm_eval  # noqa: F401
            except ImportError as err:
                raise RuntimeError(f"--eval-tasks needs lm-eval ({err}): pip install -e \".[eval]\"") from err

    @property
    def enabled(self) -> bool:
        return bool(self.tasks) and self.interval > 0

    def due(self, state: TrainState, final: bool) -> bool:
        return state.iteration > 0 and state.iteration % self.interval == 0

    def run(self, engine, state: TrainState) -> dict | None:
        from megatron_lime.evaluation.lm import LimeLM  # needs lm-eval: imported only when tasks are asked for
        from megatron_lime.evaluation.tasks import evaluate_tasks

        model = engine.module if hasattr(engine, "module") else engine
        rng = rng_state()
        was_training = model.training
        model.eval()
        try:
            lm = LimeLM(model=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=self.device,
                        rank=self.rank, world_size=self.world_size)
            report = evaluate_tasks(lm, self.tasks, limit=self.limit, data_dir=self.data_dir)
        finally:
            model.train(was_training)
            set_rng_state(rng)
        if report is not None:
            self.metrics.task_scores(report, state.iteration, state.consumed_tokens)
        return report


class Evaluators(list):
    """The run's evaluators, run in order at each call."""

    def maybe_run(self, engine, state: TrainState, final: bool = False) -> None:
        for evaluator in self:
            evaluator.maybe_run(engine, state, final)


def build_evaluators(args: TrainArgs, env: DistEnv, valid_set: Any, tokenizer: Any,
                     metrics: MetricsLogger) -> Evaluators:
    """Validation loss (--eval-interval, --eval-iters) and task scores (--eval-tasks*) of a training run."""
    logging = args.logging
    return Evaluators([
        ValidationLoss(interval=logging.eval_interval, metrics=metrics, dataset=valid_set,
                       num_samples=logging.eval_iters * args.training.global_batch_size,
                       micro_batch_size=args.training.micro_batch_size, num_workers=args.data.num_workers, env=env),
        TaskScores(interval=logging.eval_tasks_interval, metrics=metrics, tasks=list(logging.eval_tasks or []),
                   limit=logging.eval_tasks_limit, data_dir=logging.eval_tasks_data_dir,
                   batch_size=args.training.micro_batch_size, tokenizer=tokenizer, device=str(env.device),
                   rank=env.rank, world_size=env.world_size),
    ])
