"""lm-eval tasks scored during training (--eval-tasks, --eval-tasks-interval, --eval-tasks-limit).

Every data-parallel rank runs lm-eval's evaluator on the live model: lm-eval gives each rank every
world_size-th document and gathers the per-sample results on rank 0, which logs the scores (log
line, TensorBoard/W&B, metrics.jsonl). Training is left exactly as it was: the model goes back to
train mode, and every random generator (python, numpy, torch, CUDA), which lm-eval reseeds, is
restored, so the training losses are the same with and without it (tests/test_evaluation.py).
"""

from __future__ import annotations

import random

import numpy as np
import torch


class TaskEvaluator:
    def __init__(self, args, env, tokenizer, metrics):
        self.tasks = list(args.logging.eval_tasks or [])
        self.interval = args.logging.eval_tasks_interval
        self.limit = args.logging.eval_tasks_limit
        self.data_dir = args.logging.eval_tasks_data_dir
        self.batch_size = args.training.micro_batch_size
        self.env = env
        self.tokenizer = tokenizer
        self.metrics = metrics
        if self.tasks:  # fail at start-up, not after hours of training, when lm-eval is missing
            try:
                import lm_eval  # noqa: F401
            except ImportError as err:
                raise RuntimeError(f"--eval-tasks needs lm-eval ({err}): pip install -e \".[eval]\"") from err

    def maybe_run(self, engine, state) -> dict | None:
        if not self.tasks or state.iteration % self.interval:
            return None
        return self.run(engine, state)

    def run(self, engine, state) -> dict | None:
        from megatron_lime.evaluation.lm import LimeLM
        from megatron_lime.evaluation.tasks import evaluate_tasks

        model = engine.module if hasattr(engine, "module") else engine
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        was_training = model.training
        model.eval()
        try:
            lm = LimeLM(model=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=str(self.env.device),
                        rank=self.env.rank, world_size=self.env.world_size)
            report = evaluate_tasks(lm, self.tasks, limit=self.limit, data_dir=self.data_dir)
        finally:
            model.train(was_training)
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])
        if report is not None:
            self.metrics.task_scores(report, state.iteration, state.consumed_tokens)
        return report
