"""Run reports: PNG charts from metrics.jsonl and results.json files, and a report.md (tools/report.py).

    runs = {name: read_metrics(RUN_DIR/metrics.jsonl) for ...}
    run_series(records)                -> {"train_loss": ([tokens], [values]), "valid_loss": ..., ...}
    plot_run_charts(runs, out_dir)     -> {chart name: PNG path}, several runs overlaid per chart
    plot_final_scores(results, path)   -> the final task scores of runs / exported models side by side
    results_table(results)             -> a markdown table of the same
    goodput_totals(records)            -> a run's wall time by phase, summed over its starts ("goodput" records)
    plot_goodput(totals, path)         -> one stacked bar per run: where its wall time went

matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import math
import os
from typing import Any

from megatron_lime.files import atomic_write
from megatron_lime.metrics_file import GOODPUT_PHASES, PHASE_NAMES

# chart name -> (title, y label, [(series name, legend suffix)], log y)
RUN_CHARTS: dict[str, tuple[str, str, list[tuple[str, str]], bool]] = {
    "loss": ("Loss", "cross-entropy (nats/token)", [("train_loss", "train"), ("valid_loss", "validation")], False),
    "lr": ("Learning rate", "learning rate", [("lr", "")], False),
    "grad_norm": ("Gradient norm (before clipping)", "global L2 norm", [("grad_norm", "")], True),
    "throughput": ("Throughput", "tokens/s (all devices)", [("tokens_per_second", "")], False),
    "mfu": ("Model FLOPs utilisation", "MFU (%)", [("mfu", "")], False),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Every plotted series of one run as (consumed tokens, values); missing or non-finite values left out."""
    series: dict[str, tuple[list[int], list[float]]] = {}

    def add(name: str, tokens: int, value: Any, scale: float = 1.0) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs, ys = series.setdefault(name, ([], []))
            xs.append(tokens)
            ys.append(value * scale)

    for record in sorted(records, key=lambda r: (r["iteration"], r["kind"])):
        tokens = record.get("consumed_tokens", 0)
        if record["kind"] == "train":
            add("train_loss", tokens, record.get("loss"))
            for key in ("lr", "grad_norm", "tokens_per_second"):
                add(key, tokens, record.get(key))
            add("mfu", tokens, record.get("mfu"), 100.0)
        elif record["kind"] == "valid":
            add("valid_loss", tokens, record.get("loss"))
        elif record["kind"] == "tasks":
            for task, score in record.get("scores", {}).items():
                add(f"task/{task}", tokens, score)
    return series


def _save(fig, path: str) -> str:
    with atomic_write(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_run_charts(runs: dict[str, dict[str, tuple[list[int], list[float]]]], out_dir: str) -> dict[str, str]:
    """One PNG per chart with data in any run (runs overlaid, x = tokens seen); returns {chart: path}."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}
    charts = dict(RUN_CHARTS)
    tasks = sorted({name for series in runs.values() for name in series if name.startswith("task/")})
    if tasks:
        charts["task_scores"] = ("Task scores during training", "score", [(t, t.removeprefix("task/")) for t in tasks],
                                 False)
    for chart, (title, ylabel, wanted, log_y) in charts.items():
        lines = [(run, series[name], suffix) for run, series in runs.items() for name, suffix in wanted
                 if name in series]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, (xs, ys), suffix in lines:
            label = " ".join(part for part in (run if len(runs) > 1 else "", suffix) if part) or run
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set(title=title, xlabel="tokens seen", ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written[chart] = _save(fig, os.path.join(out_dir, f"{chart}.png"))
        plt.close(fig)
    return written


def final_scores(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """(task names in first-seen order, {model: {task: score}}) from results.json contents."""
    tasks: list[str] = []
    scores: dict[str, dict[str, float | None]] = {}
    for model, result in results.items():
        scores[model] = {}
        for task, entry in result["tasks"].items():
            if task not in tasks:
                tasks.append(task)
            scores[model][task] = entry.get("score")
    return tasks, scores


def plot_final_scores(results: dict[str, dict[str, Any]], path: str) -> str:
    """Grouped bars: one group per task, one bar per model (the model card's chart, for your models)."""
    plt = _pyplot()
    tasks, scores = final_scores(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(results)) ** 0.5 + 2), 4))
    width = 0.8 / max(len(results), 1)
    for k, (model, by_task) in enumerate(scores.items()):
        scored = [i for i, t in enumerate(tasks) if by_task.get(t) is not None]  # a missing task gets no bar, not 0
        xs = [i + (k - (len(results) - 1) / 2) * width for i in scored]
        bars = ax.bar(xs, [100 * by_task[tasks[i]] for i in scored], width=width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set(ylabel="score (%)", title="Task scores", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def goodput_totals(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """{phase: seconds} summed over every start of the run (each writes a "goodput" record at its end; one that
    crashed wrote none, and the next start counts the steps it redoes); None if no start recorded one."""
    found = [r for r in records if r["kind"] == "goodput"]
    if not found:
        return None
    return {phase: sum(r["seconds"].get(phase, 0.0) for r in found) for phase in GOODPUT_PHASES}


def plot_goodput(totals: dict[str, dict[str, float]], path: str) -> str:
    """One horizontal stacked bar per run: its wall time split into steps, start-up, evaluation, checkpoint,
    data wait, redone steps and the rest; the goodput (the steps' share) is written at the bar's end."""
    plt = _pyplot()
    names = list(totals)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(names)))
    colors = dict(zip(GOODPUT_PHASES, ("tab:green", "tab:gray", "tab:blue", "tab:orange", "tab:purple", "tab:red",
                                       "lightgray")))
    for phase in GOODPUT_PHASES:
        lefts = [sum(totals[n][p] for p in GOODPUT_PHASES[:GOODPUT_PHASES.index(phase)]) for n in names]
        ax.barh(names, [totals[n][phase] for n in names], left=lefts, color=colors[phase], label=PHASE_NAMES[phase])
    for i, name in enumerate(names):
        wall = sum(totals[name].values())
        ax.text(wall, i, f"  goodput {100 * totals[name]['steps'] / wall:.1f}%", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="wall time (s, all starts of the run)", title="Where the wall time went (goodput = steps' share)")
    ax.margins(x=0.2)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(names) < 3 else -0.15))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def goodput_table(totals: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per run, seconds and share of each phase."""
    rows = ["| run | goodput | wall (s) | " + " | ".join(PHASE_NAMES[p] + " (s)" for p in GOODPUT_PHASES) + " |",
            "|" + "---|" * (len(GOODPUT_PHASES) + 3)]
    for name, seconds in totals.items():
        wall = sum(seconds.values())
        rows.append(f"| {name} | {100 * seconds['steps'] / wall:.1f}% | {wall:.1f} | "
                    + " | ".join(f"{seconds[p]:.1f}" for p in GOODPUT_PHASES) + " |")
    return "\n".join(rows)


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per task, one column per model, `score ± stderr (metric, n)`."""
    tasks, _ = final_scores(results)
    header = "| task | " + " | ".join(results) + " |"
    rows = [header, "|" + "---|" * (len(results) + 1)]
    for task in tasks:
        cells = []
        for result in results.values():
            entry = result["tasks"].get(task)
            if entry is None or entry.get("score") is None:
                cells.append("-")
                continue
            metric = entry["score_metric"]
            stderr = entry["metrics"].get(f"{metric}_stderr")
            spread = f" ± {100 * stderr:.1f}" if isinstance(stderr, float) else ""
            cells.append(f"{100 * entry['score']:.1f}{spread} ({metric}, n={entry['n_samples']})")
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
