"""Running lm-eval tasks on a LimeLM, offline data, and the results JSON.

    results = evaluate_tasks(lm, ["arc_easy", "piqa"], limit=100, data_dir="eval_data")
    results["tasks"]["arc_easy"] == {"metrics": {"acc": .., "acc_stderr": .., "acc_norm": .., ...},
                                     "score": .., "score_metric": "acc_norm", "n_samples": 100, "n_total": 2376}

Offline data (`data_dir`): every lm-eval task loads its data with
`datasets.load_dataset(path=HUB_ID, name=CONFIG, ...)`; here that call reads DATA_DIR/HUB_ID/, the
folder `huggingface-cli download --repo-type dataset HUB_ID --local-dir DATA_DIR/HUB_ID` writes
(parquet/json files with the README's `configs:` table). lm-eval 0.4 has no public override of one
task's dataset_path that keeps the rest of its registered YAML (a dict spec replaces the YAML
rather than updating it), so the redirect sits at that one call, and applies to every task alike,
a user's own --include-path YAMLs included.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Iterator, Sequence

from megatron_lime.errors import LimeInputError

# Our reading of the model card's benchmark chart (the card shows only an image): the standard
# zero-shot set for small English models.
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa", "mmlu")

# The metric a task's single score is read from: length-normalised accuracy where lm-eval has one
# (multiple choice with answers of different lengths), plain accuracy otherwise.
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "f1", "word_perplexity")


class MissingDatasetError(FileNotFoundError, LimeInputError):
    """A task's dataset is not in --data-dir; the message is the one line to show."""


@contextlib.contextmanager
def local_datasets(data_dir: str | None) -> Iterator[None]:
    """While active, `datasets.load_dataset(HUB_ID, ...)` reads DATA_DIR/HUB_ID/ (no network)."""
    if data_dir is None:
        yield
        return
    import datasets

    original = datasets.load_dataset
    data_dir = os.path.abspath(data_dir)

    def load_local(path: str, *args: Any, **kwargs: Any):
        if os.path.isabs(path) or os.path.exists(path):  # a local path already (a user's own YAML)
            return original(path, *args, **kwargs)
        local = os.path.join(data_dir, path)
        if not os.path.isdir(local):
            raise MissingDatasetError(
                f"{local}: missing (dataset {path}); get it with: huggingface-cli download --repo-type dataset "
                f"{path} --local-dir {local}")
        # datasets' cache key for a local folder can match another folder's with the same file names
        # (seen: a test's 6-row copy served for a 200-row one), so each data dir keeps its own cache.
        kwargs.setdefault("cache_dir", os.path.join(data_dir, ".datasets_cache"))
        return original(local, *args, **kwargs)

    datasets.load_dataset = load_local
    try:
        yield
    finally:
        datasets.load_dataset = original


def main_metric(metrics: dict[str, float]) -> str | None:
    for name in PREFERRED_METRICS:
        if name in metrics:
            return name
    return next((name for name in metrics if not name.endswith("_stderr")), None)


def _clean_metrics(raw: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's {"acc,none": .., "acc_stderr,none": ..} -> {"acc": .., "acc_stderr": ..} (filter "none")."""
    metrics: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        name, filter_name = key.split(",", 1)
        name = name if filter_name == "none" else f"{name}[{filter_name}]"
        if isinstance(value, (int, float)):
            metrics[name] = float(value)
        elif value == "N/A":
            metrics[name] = None
    return metrics


def summarize(raw: dict[str, Any], requested: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per requested task (or group): metrics with standard errors, the score, and sample counts."""
    results, n_samples = raw["results"], raw.get("n-samples", {})
    group_members = {name: members for name, members in raw.get("group_subtasks", {}).items()}

    def leaves(name: str) -> list[str]:
        members = group_members.get(name)
        if not members:
            return [name]
        return [leaf for member in members for leaf in leaves(member)]

    summary: dict[str, dict[str, Any]] = {}
    for name in requested:
        if name not in results:
            continue
        metrics = _clean_metrics(results[name])
        counts = [n_samples[leaf] for leaf in leaves(name) if leaf in n_samples]
        metric = main_metric({k: v for k, v in metrics.items() if v is not None})
        summary[name] = {
            "metrics": metrics,
            "score_metric": metric,
            "score": metrics.get(metric) if metric else None,
            "n_samples": sum(c["effective"] for c in counts),
            "n_total": sum(c["original"] for c in counts),
        }
        if name in group_members:
            summary[name]["subtasks"] = len(leaves(name))
    return summary


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's index of tasks (it reads every task YAML: built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
    """Raise KeyError naming the tasks lm-eval does not know (before any model is loaded)."""
    known = set(task_manager(include_path).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise LimeInputError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm_eval ls tasks`, or give "
                             f"--include-path with your own task YAMLs)")


def evaluate_tasks(lm, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | float | None = None,
                   data_dir: str | None = None, include_path: str | None = None, log_samples: bool = False,
                   seed: int = 1234) -> dict[str, Any] | None:
    """Run lm-eval's own evaluator on `lm`; rank 0 gets {"tasks", "lm_eval_version", ...}, other ranks None.

    Raises KeyError naming unknown tasks and MissingDatasetError naming a missing data folder.
    """
    import lm_eval

    check_tasks(tasks, include_path)
    manager = task_manager(include_path)
    with local_datasets(data_dir):
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=log_samples, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    if raw is None:  # not rank 0
        return None
    report = {
        "lm_eval_version": lm_eval.__version__,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "tasks": summarize(raw, tasks),
    }
    if log_samples:
        # Documents may hold values JSON cannot store (dates, arrays): those become strings.
        report["samples"] = json.loads(json.dumps(raw.get("samples", {}), default=str))
    return report
