#!/usr/bin/env python
"""Print the quickstart's learning summary from its logs: validation loss at the start and the end."""

import math
import re
import sys

VALIDATION = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.eE+-]+)")
GOODPUT = re.compile(r"^ goodput (.*)$", re.M)


def validation_losses(log_path: str) -> list[tuple[int, float]]:
    with open(log_path, encoding="utf-8", errors="replace") as log:
        return [(int(m.group(1)), float(m.group(2))) for m in VALIDATION.finditer(log.read())]


def main() -> int:
    out_dir, vocab_size = sys.argv[1], int(sys.argv[2])
    print(f"summary (ln(vocab {vocab_size}) = {math.log(vocab_size):.2f}, the loss of a uniform guess):")
    for stage in ("pretrain", "sft"):
        losses = validation_losses(f"{out_dir}/logs/{stage}.log")
        if not losses:
            print(f"  {stage}: no validation loss in {out_dir}/logs/{stage}.log")
            return 1
        (first_step, first), (last_step, last) = losses[0], losses[-1]
        print(f"  {stage:8s} validation loss: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
    for stage in ("pretrain", "sft"):  # where each run's wall time went (training/metrics.py's Goodput)
        with open(f"{out_dir}/logs/{stage}.log", encoding="utf-8", errors="replace") as log:
            lines = GOODPUT.findall(log.read())
        if lines:
            print(f"  {stage:8s} goodput {lines[-1]}")
    print_evaluation(out_dir)
    return 0


def print_evaluation(out_dir: str) -> None:
    """The lm-eval scores of the evaluate stage and the report's files."""
    import glob
    import json
    import os

    results = {}
    for name in ("pretrain", "sft_hf"):
        path = os.path.join(out_dir, "eval", f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                results[name] = json.load(f)
    if results:
        from megatron_lime.evaluation.report import results_table

        print("  task scores (lm-eval, local sentence completion from the corpus; chance 25%):")
        print("\n".join("    " + line for line in results_table(results).splitlines()))
    report = os.path.join(out_dir, "report")
    if os.path.isdir(report):
        print(f"  report: {os.path.join(report, 'report.md')} with "
              + ", ".join(sorted(os.path.basename(p) for p in glob.glob(os.path.join(report, "*.png")))))


if __name__ == "__main__":
    sys.exit(main())
