"""metrics.jsonl: what a training run records about itself, and the one reader of it.

Written by training/metrics.py (MetricsLogger) as SAVE_DIR/metrics.jsonl when --save is given; read by the
reports (evaluation/report.py, tools/report.py). One JSON object per line:
  {"kind": "train", "iteration", "consumed_tokens", "loss", "lr", "grad_norm", "ms_per_step",
   "tokens_per_second", "tflops_per_device", "mfu", "memory_gib", "skipped", "skipped_total"}
  {"kind": "valid", "iteration", "consumed_tokens", "loss", "ppl"}
  {"kind": "tasks", "iteration", "consumed_tokens", "scores": {task: score}, "metrics": {task: {..}}}
  {"kind": "goodput", "iteration", "first_iteration", "steps", "redone_steps", "wall_s", "goodput",
   "seconds": {phase: s}}   one per process that reached its end (training/metrics.py's Goodput)
A resumed run first drops the lines after its checkpoint's iteration (they belong to the
abandoned part of the earlier run), so no iteration appears twice; "goodput" lines are kept
(that time was spent).

The file format sits on the ground floor because its writer (training) and its readers (the reports) are in
different packages, neither of which may import the other.
"""

from __future__ import annotations

import json
from typing import Any

from megatron_lime.errors import LimeInputError

METRICS_FILE = "metrics.jsonl"

# Where a run's wall time goes (a "goodput" record's "seconds"), in the order the reports stack them.
GOODPUT_PHASES = ("steps", "startup", "evaluation", "checkpoint", "data", "redone", "other")
PHASE_NAMES = {"steps": "steps", "startup": "start-up", "evaluation": "evaluation", "checkpoint": "checkpoint",
               "data": "data wait", "redone": "redone", "other": "other"}


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped, any other bad line
    is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise LimeInputError(f"{path}:{number}: not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or "iteration" not in record or "kind" not in record:
            raise LimeInputError(f"{path}:{number}: a metrics record needs \"kind\" and \"iteration\"")
        records.append(record)
    return records
