"""lm-eval tasks scored during training (--eval-tasks, --eval-tasks-interval, --eval-tasks-limit).

Every data-parallel rank runs lm-eval's evaluator on the live model: lm-eval gives each rank every
world_size-th document and gathers the per-sample results on rank 0, which logs the scores (log
line, TensorBoard/W&B, metrics.jsonl). Training is left exactly as it was: the model goes back to
train mode, and every random generator (python, numpy, torch, CUDA), which lm-eval reseeds, is
restored with the snapshot a checkpoint saves (training/checkpointing.rng_state), so the training
losses are the same with and without it (tests/test_evaluation.py).

TaskEvaluator takes what it needs as arguments; task_evaluator(args, ...) reads them from the typed
training arguments (training/config.py's TrainArgs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_lime.training.config import TrainArgs


@dataclass(kw_only=True)
class TaskEvaluator:
    """Runs `tasks` every `interval` steps on the live model, with every rank taking a share."""

    tasks: list[str]  # lm-eval task or group names; empty: never runs
    interval: int  # steps between runs
    limit: float | None  # at most this many documents per task (a fraction < 1 takes that share)
    data_dir: str | None  # offline task data: DIR/<hub dataset id>/
    batch_size: int  # requests per forward pass
    tokenizer: Any  # the run's megatron_lime tokenizer
    metrics: Any  # training/metrics.py's logger: task_scores(report, iteration, tokens)
    device: str
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.tasks:  # fail at start-up, not after hours of training, when lm-eval is missing
            try:
                import lm_eval  # noqa: F401
            except ImportError as err:
                raise RuntimeError(f"--eval-tasks needs lm-eval ({err}): pip install -e \".[eval]\"") from err

    def maybe_run(self, engine, state) -> dict | None:
        if not self.tasks or state.iteration % self.interval:
            return None
        with self.metrics.goodput.phase("evaluation"):
            return self.run(engine, state)

    def run(self, engine, state) -> dict | None:
        from megatron_lime.evaluation.lm import LimeLM
        from megatron_lime.evaluation.tasks import evaluate_tasks
        from megatron_lime.training.checkpointing import rng_state, set_rng_state

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


def task_evaluator(args: TrainArgs, env: Any, tokenizer: Any, metrics: Any) -> TaskEvaluator:
    """The TaskEvaluator of a training run: --eval-tasks* flags, the micro-batch size, this rank's device."""
    return TaskEvaluator(tasks=list(args.logging.eval_tasks or []), interval=args.logging.eval_tasks_interval,
                         limit=args.logging.eval_tasks_limit, data_dir=args.logging.eval_tasks_data_dir,
                         batch_size=args.training.micro_batch_size, tokenizer=tokenizer, metrics=metrics,
                         device=str(env.device), rank=env.rank, world_size=env.world_size)
