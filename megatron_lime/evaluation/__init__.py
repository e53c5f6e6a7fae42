"""Evaluation on lm-evaluation-harness tasks (needs the `eval` extra: pip install -e ".[eval]").

    from megatron_lime.evaluation import LimeLM, evaluate_tasks, DEFAULT_TASKS
    lm = LimeLM(load="checkpoints/lime-1b")                      # also registers `--model lime` with lm-eval
    results = evaluate_tasks(lm, DEFAULT_TASKS, data_dir="eval_data")

tools/evaluate.py is the command line; training's --eval-tasks runs the same code in process.
"""

from megatron_lime.evaluation.lm import LimeLM, load_checkpoint_model
from megatron_lime.evaluation.tasks import DEFAULT_TASKS, MissingDatasetError, evaluate_tasks, local_datasets

__all__ = ["DEFAULT_TASKS", "LimeLM", "MissingDatasetError", "evaluate_tasks", "load_checkpoint_model",
           "local_datasets"]
