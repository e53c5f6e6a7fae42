"""The README's main command, examples/quickstart.sh, with its smallest settings: every stage for real."""

import os
import re
import subprocess
import sys

from megatron_lime.training.launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["data", "tokenizer", "preprocess", "pretrain", "sft-data", "sft", "convert", "evaluate", "report"]


def run_quickstart(out_dir: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "QUICKSTART_DIR": out_dir, "QUICKSTART_SIZE": "smallest",
                   "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env}
    return subprocess.run(["bash", os.path.join(REPO, "examples", "quickstart.sh")], env=environment,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


def test_quickstart_runs_every_stage_then_skips_them(tmp_path):
    out = str(tmp_path / "quickstart")
    first = run_quickstart(out, MASTER_PORT=str(free_port()))
    assert first.returncode == 0, first.stdout[-4000:]
    for stage in STAGES:
        assert re.search(rf"\[{re.escape(stage)} *\] done in \d+s -> ", first.stdout), (stage, first.stdout[-3000:])
    # The card's generate call produced an answer of at least min_new_tokens=16 tokens.
    answer = re.search(r"answer \((\d+) tokens\): (.*)", first.stdout)
    assert answer and int(answer.group(1)) >= 16 and answer.group(2).strip(), first.stdout[-2000:]
    # Validation loss at the start of pretraining is close to ln(512) = 6.24 and falls from there.
    losses = re.search(r"pretrain +validation loss: ([\d.]+) at step 0 -> ([\d.]+) at step (\d+)", first.stdout)
    assert losses, first.stdout[-2000:]
    start, end = float(losses.group(1)), float(losses.group(2))
    assert abs(start - 6.24) < 0.5 and end < start - 0.5
    for path in ("hf/config.json", "hf/model.safetensors", "hf/modeling_lime.py", "tokenizer/tokenizer.model",
                 "data/sample_text_document.bin", "checkpoints/pretrain/latest", "checkpoints/sft/latest",
                 "checkpoints/pretrain/metrics.jsonl", "eval/pretrain.json", "eval/sft_hf.json",
                 "report/report.md", "report/loss.png", "report/final_scores.png", "report/goodput.png"):
        assert os.path.exists(os.path.join(out, path)), path
    # The summary ends with lm-eval's scores of both models and the report's pictures.
    assert re.search(r"\| hellaswag \| [\d.]+ ± [\d.]+ \(acc_norm, n=20\) \| [\d.]+ ± [\d.]+ \(acc_norm, n=20\) \|",
                     first.stdout), first.stdout[-2000:]
    assert re.search(r"report: .*report.md with .*loss.png", first.stdout), first.stdout[-2000:]
    for stage in ("pretrain", "sft"):  # where each run's wall time went
        assert re.search(rf"{stage} +goodput \d+\.\d% of [\d:]+ wall, iterations 0 -> \d+ \| steps ", first.stdout)

    second = run_quickstart(out, MASTER_PORT=str(free_port()))
    assert second.returncode == 0, second.stdout[-3000:]
    for stage in STAGES:
        assert re.search(rf"\[{re.escape(stage)} *\] skipped: done in an earlier run", second.stdout), stage


def test_a_failing_stage_is_named_with_its_log(tmp_path):
    out = str(tmp_path / "quickstart")
    result = run_quickstart(out, PRETRAIN_CORPUS=str(tmp_path / "missing.jsonl"))
    assert result.returncode != 0
    assert "FAILED" in result.stdout and "logs/tokenizer.log" in result.stdout
    assert "quickstart stopped at stage 'tokenizer'" in result.stdout
