"""Evaluation on lm-evaluation-harness tasks (needs the `eval` extra: pip install -e ".[eval]").

    from megatron_lime.evaluation import LimeLM, evaluate_tasks, DEFAULT_TASKS
    lm = LimeLM(load="checkpoints/lime-1b")                      # also registers `--model lime` with lm-eval
    results = evaluate_tasks(lm, DEFAULT_TASKS, data_dir="eval_data")

tools/evaluate.py is the command line; training's --eval-tasks runs the same code in process
(training/evaluators.py's TaskScores). Names are imported on first use, so training without --eval-tasks
never needs lm-eval installed. Nothing here imports from training/: evaluation sits below it.
"""

from importlib import import_module

_EXPORTS = {
    "LimeLM": "megatron_lime.evaluation.lm",
    "DEFAULT_TASKS": "megatron_lime.evaluation.tasks", "MissingDatasetError": "megatron_lime.evaluation.tasks",
    "evaluate_tasks": "megatron_lime.evaluation.tasks", "local_datasets": "megatron_lime.evaluation.tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
