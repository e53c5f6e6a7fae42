"""metrics.jsonl (appended across resumes, no iteration twice) and tools/report.py's inputs and errors.

Rendering from a real run is in tests/test_evaluation.py (test_report_renders_the_real_runs), which
trains the run it renders.
"""

from __future__ import annotations

import json

import pytest

from helpers import load_tool
from megatron_lime.metrics_file import read_metrics
from megatron_lime.training.metrics import MetricsLogger, StepMetrics


def step(iteration: int, loss: float) -> StepMetrics:
    return StepMetrics(iteration=iteration, train_iters=10, consumed_samples=4 * iteration,
                       consumed_tokens=128 * iteration, loss=loss, lr=1e-3, grad_norm=float("nan"), ms_per_step=10.0,
                       tokens_per_second=1000.0, world_size=1, flops_per_token=1e6, peak_tflops=None,
                       memory_gib=0.1, memory_kind="owned", skipped_in_window=0, skipped_total=0)


def logger(save_dir, rank: int = 0) -> MetricsLogger:
    return MetricsLogger(rank, None, None, None, {"checkpoint": {"save": str(save_dir)}})


def test_metrics_log_appends_across_a_resume_without_duplicates(tmp_path, capsys):
    first = logger(tmp_path)
    first.start_at(0)
    first.scalars({"valid/lm_loss": 6.0, "valid/ppl": 403.0}, 0, 0)
    for i in range(1, 7):
        first.log(step(i, 6.0 - 0.1 * i))
    # The run died after iteration 6; its last checkpoint was at 4. The resumed run writes 5 and 6 again.
    resumed = logger(tmp_path)
    resumed.start_at(4)
    for i in range(5, 9):
        resumed.log(step(i, 5.0 - 0.1 * i))
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["kind"], r["iteration"]) for r in records] == [("valid", 0)] + [("train", i) for i in range(1, 9)]
    assert records[5]["loss"] == pytest.approx(4.5)  # iteration 5 from the resumed run
    assert records[1]["grad_norm"] is None  # NaN is written as null (valid JSON)
    assert {"tokens_per_second", "tflops_per_device", "mfu", "memory_gib", "lr", "skipped"} <= set(records[1])
    # Other ranks never write.
    logger(tmp_path, rank=1).log(step(9, 1.0))
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 9


def test_a_torn_last_line_is_skipped_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "iteration": 1, "loss": 1.0}) + '\n{"kind": "tra')
    assert len(read_metrics(str(path))) == 1
    path.write_text('{"kind": "tra\n' + json.dumps({"kind": "train", "iteration": 1}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not valid JSON"):
        read_metrics(str(path))


def test_report_errors_name_the_file(tmp_path, capsys):
    report = load_tool("report")
    assert report.main([str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'run' / 'metrics.jsonl'}: missing" in capsys.readouterr().err
    bad = tmp_path / "results.json"
    bad.write_text('{"tasks": 3}')
    assert report.main([str(bad), "--output", str(tmp_path / "out")]) == 1
    assert "not a tools/evaluate.py results file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.md").exists()


def test_final_scores_compare_results_files(tmp_path):
    report = load_tool("report")
    results = {}
    for name, score in (("model_a", 0.40), ("model_b", 0.55)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"tasks": {
            "arc_easy": {"metrics": {"acc_norm": score, "acc_norm_stderr": 0.02}, "score_metric": "acc_norm",
                         "score": score, "n_samples": 100},
            "boolq": {"metrics": {"acc": score + 0.1, "acc_stderr": 0.01}, "score_metric": "acc",
                      "score": score + 0.1, "n_samples": 100}}}))
        results[name] = str(path)
    out = tmp_path / "out"
    assert report.main([*results.values(), "--output", str(out)]) == 0
    assert (out / "final_scores.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert "| task | model_a | model_b |" in text
    assert "| arc_easy | 40.0 ± 2.0 (acc_norm, n=100) | 55.0 ± 2.0 (acc_norm, n=100) |" in text
    assert not (out / "loss.png").exists()
