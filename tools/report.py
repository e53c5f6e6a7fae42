#!/usr/bin/env python
"""Charts and a report.md for training runs and evaluated models, no display needed.

    python tools/report.py checkpoints/lime-1b-pretrain --output report/
    python tools/report.py runs/a runs/b results_a.json results_b.json --output compare/

Each RUN_DIR is a training --save directory with metrics.jsonl (written by training); several are
overlaid on each chart. A .json argument is a tools/evaluate.py results file. Writes into --output:
loss.png (train and validation loss against tokens seen), lr.png, grad_norm.png, throughput.png,
mfu.png (GPU runs), task_scores.png (in-training --eval-tasks), final_scores.png (the last task
scores of each run and each results file, side by side), goodput.png (one stacked bar per run: where its
wall time went) and report.md embedding them with tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from megatron_lime.errors import LimeInputError, reports_input_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_RESULTS",
                        help="Training save directories (with metrics.jsonl) and/or tools/evaluate.py results "
                             "JSON files.")
    parser.add_argument("--output", required=True, help="Directory for the PNGs and report.md.")
    return parser


def unique_names(paths: list[str]) -> list[str]:
    """Short labels: the last path component, with its parent where two would collide."""
    names = [os.path.basename(os.path.normpath(p)).removesuffix(".json") for p in paths]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(p))), n) if names.count(n) > 1 else n
            for p, n in zip(paths, names)]


def last_task_results(records: list[dict]) -> dict | None:
    """A run's last in-training task scores, in the results.json layout (for the final-score chart)."""
    tasks = [r for r in records if r["kind"] == "tasks"]
    if not tasks:
        return None
    last = tasks[-1]
    from megatron_lime.evaluation.tasks import main_metric

    entries = {}
    for task, metrics in last["metrics"].items():
        metric = main_metric({k: v for k, v in metrics.items() if v is not None})
        entries[task] = {"metrics": metrics, "score_metric": metric, "score": last["scores"].get(task),
                         "n_samples": last.get("n_samples", {}).get(task)}
    return {"iteration": last["iteration"], "consumed_tokens": last["consumed_tokens"], "tasks": entries}


def run_summary_row(name: str, records: list[dict]) -> str:
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid" and r.get("loss") is not None]
    last = max((r for r in records if r["kind"] != "goodput"), key=lambda r: r["iteration"], default=records[-1])

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    speeds = [r["tokens_per_second"] for r in train if r.get("tokens_per_second")]
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    final_train = fmt(train[-1]["loss"] if train else None, ".3f")
    first_valid, last_valid = (fmt(valid[i]["loss"] if valid else None, ".3f") for i in (0, -1))
    speed = fmt(statistics.median(speeds) if speeds else None, ",.0f")
    mfu = fmt(100 * statistics.median(mfus) if mfus else None, ".1f")
    return (f"| {name} | {last['iteration']:,} | {last.get('consumed_tokens', 0):,} | "
            f"{final_train} | {first_valid} -> {last_valid} | {speed} | {mfu} |")


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from megatron_lime.evaluation.report import (goodput_table, goodput_totals, plot_final_scores, plot_goodput,
                                                     plot_run_charts, results_table, run_series)
    except ImportError as err:
        print(f"error: {err}: reports need matplotlib: pip install -e \".[eval]\"", file=sys.stderr)
        return 2
    from megatron_lime.files import read_json, write_text
    from megatron_lime.metrics_file import METRICS_FILE, read_metrics

    runs: dict[str, list[dict]] = {}
    results: dict[str, dict] = {}
    for path, name in zip(args.inputs, unique_names(args.inputs)):
        if path.endswith(".json") and os.path.isfile(path):
            result = read_json(path)
            if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
                raise LimeInputError(f"{path}: not a tools/evaluate.py results file (no \"tasks\" object)")
            results[name] = result
            continue
        metrics_path = os.path.join(path, METRICS_FILE)
        if not os.path.isfile(metrics_path):
            raise LimeInputError(f"{metrics_path}: missing (training writes it into its --save directory)")
        records = read_metrics(metrics_path)
        if not records:
            raise LimeInputError(f"{metrics_path}: no records yet")
        runs[name] = records
        in_training = last_task_results(records)
        if in_training is not None:
            results.setdefault(name, in_training)

    charts = plot_run_charts({name: run_series(records) for name, records in runs.items()}, args.output)
    if results:
        charts["final_scores"] = plot_final_scores(results, os.path.join(args.output, "final_scores.png"))
    goodput = {name: totals for name, records in runs.items() if (totals := goodput_totals(records)) is not None}
    if goodput:
        charts["goodput"] = plot_goodput(goodput, os.path.join(args.output, "goodput.png"))

    lines = ["# Run report", ""]
    if runs:
        lines += ["| run | iterations | tokens | last train loss | validation loss (first -> last) | tokens/s (median) "
                  "| MFU % (median) |", "|---|---|---|---|---|---|---|"]
        lines += [run_summary_row(name, records) for name, records in runs.items()]
        lines.append("")
    titles = {"loss": "Loss", "lr": "Learning rate", "grad_norm": "Gradient norm", "throughput": "Throughput",
              "mfu": "MFU", "task_scores": "Task scores during training", "final_scores": "Final task scores",
              "goodput": "Goodput: where the wall time went"}
    for chart, png in charts.items():
        lines += [f"## {titles[chart]}", "", f"![{chart}]({os.path.basename(png)})", ""]
        if chart == "final_scores":
            lines += [results_table(results), ""]
        if chart == "goodput":
            lines += [goodput_table(goodput), ""]
    if runs and "mfu" not in charts:
        lines += ["MFU is not plotted: it needs a GPU's peak FLOP/s (CPU runs report n/a; pass --peak-tflops "
                  "for a GPU missing from the table).", ""]
    write_text(os.path.join(args.output, "report.md"), "\n".join(lines))
    for png in charts.values():
        print(png)
    print(os.path.join(args.output, "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
