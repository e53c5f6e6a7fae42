"""Goodput: every run accounts for its wall time (training/metrics.py's Goodput), writes it to metrics.jsonl,
prints one summary line at its end, and tools/report.py draws one stacked bar per run."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from helpers import load_tool, make_tiny_pretraining_data, train_tiny
from megatron_lime.metrics_file import GOODPUT_PHASES, read_metrics
from megatron_lime.training.metrics import Goodput, MetricsLogger

SUMMARY = re.compile(r" goodput (\d+\.\d)% of (\S+) wall, iterations (\d+) -> (\d+) \| steps ")


def test_the_phases_add_up_to_the_wall_time_and_redone_steps_are_not_goodput():
    goodput = Goodput()
    goodput.redo_until = 2  # the run before got to iteration 2, past this run's checkpoint at 0
    batches = goodput.batches(iter(range(4)))
    with goodput.phase("evaluation"):  # before the loop: evaluation, not start-up
        time.sleep(0.02)
    for iteration in range(1, 4):
        next(batches)
        time.sleep(0.03)  # the step
        goodput.step_done(iteration)
        if iteration == 2:
            with goodput.phase("checkpoint"):
                time.sleep(0.05)
    record = goodput.finish()
    seconds = record["seconds"]
    assert set(seconds) == set(GOODPUT_PHASES)
    assert sum(seconds.values()) == pytest.approx(record["wall_s"], abs=1e-6)
    assert (record["first_iteration"], record["iteration"], record["steps"], record["redone_steps"]) == (0, 3, 1, 2)
    assert 0.055 < seconds["redone"] < 0.2 and 0.025 < seconds["steps"] < 0.1  # the save is not in step 3
    assert 0.05 <= seconds["checkpoint"] < 0.1 and 0.02 <= seconds["evaluation"] < 0.07
    assert seconds["startup"] > 0.1  # since the process started: the imports of this test session at least
    assert record["goodput"] == pytest.approx(seconds["steps"] / record["wall_s"])


def test_goodput_records_survive_a_resume_and_the_furthest_iteration_is_redone(tmp_path):
    first = MetricsLogger(0, None, None, None, {"checkpoint": {"save": str(tmp_path)}})
    first.start_at(0)
    first.close()  # a start that ended (its "goodput" record, at iteration 0)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a later start that crashed after logging iteration 7
        f.write(json.dumps({"kind": "train", "iteration": 7, "consumed_tokens": 70, "loss": 5.0}) + "\n")
    resumed = MetricsLogger(0, None, None, None, {"checkpoint": {"save": str(tmp_path)}})
    resumed.start_at(4)
    assert resumed.goodput.redo_until == 7
    assert [r["kind"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == ["goodput"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")))


def test_a_run_and_its_resume_account_for_their_time_and_the_report_draws_them(tiny_data, tmp_path):
    save = tmp_path / "run"
    first = train_tiny(tiny_data, save, "--eval-interval", "2", "--eval-iters", "1", "--split", "90,10,0")
    assert first.returncode == 0, first.stdout[-3000:]
    match = SUMMARY.search(first.stdout)
    assert match and match.group(3, 4) == ("0", "4"), first.stdout[-3000:]
    record = [r for r in read_metrics(str(save / "metrics.jsonl")) if r["kind"] == "goodput"][-1]
    assert record["steps"] == 4 and record["redone_steps"] == 0
    assert record["seconds"]["evaluation"] > 0 and record["seconds"]["checkpoint"] > 0
    assert f"{100 * record['goodput']:.1f}" == match.group(1)
    # The last checkpoint is lost (as if the run had died before writing it): the resumed run redoes 3 and 4.
    (save / "latest").write_text("global_step2")
    os.rename(save / "global_step4", tmp_path / "lost")
    resumed = train_tiny(tiny_data, save, "--eval-interval", "2", "--eval-iters", "1", "--split", "90,10,0")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "redone" in resumed.stdout and SUMMARY.search(resumed.stdout).group(3, 4) == ("2", "4")
    records = [r for r in read_metrics(str(save / "metrics.jsonl")) if r["kind"] == "goodput"]
    assert [(r["steps"], r["redone_steps"]) for r in records] == [(4, 0), (0, 2)]
    assert records[1]["seconds"]["redone"] > 0 and records[1]["goodput"] == 0.0

    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert load_tool("report").main([str(save), "--output", str(out)]) == 0
    assert (out / "goodput.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Goodput: where the wall time went" in report and "| run | goodput | wall (s) |" in report
