"""Evaluation through lm-evaluation-harness, offline, on a tiny trained model.

The tests write tiny datasets in the hub's layout and the benchmarks' exact column schemas
(megatron_lime/evaluation/sample_tasks.py), train lime-tiny for a few steps with 2 data-parallel
processes, then: tools/evaluate.py on every task; the same scores and per-sample log-likelihoods
as lm-eval's own `--model hf` on the export; in-training --eval-tasks leaves the losses unchanged;
tools/report.py renders the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402

from megatron_lime.evaluation.sample_tasks import TASK_DATASETS, write_hub_dataset, write_synthetic_tasks  # noqa: E402
from helpers import load_tool  # noqa: E402
from megatron_lime.training.launch import free_port  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = list(TASK_DATASETS)  # hellaswag, arc_easy, arc_challenge, piqa, winogrande, boolq, openbookqa

# A user's own tasks (--include-path): greedy generation until stop strings, and rolling log-likelihood.
OWN_TASKS = {
    "lime_tiny_generate.yaml": """task: lime_tiny_generate
dataset_path: lime-tests/tiny_text
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: [".", ";"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "lime_tiny_perplexity.yaml": """task: lime_tiny_perplexity
dataset_path: lime-tests/tiny_text
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
}


def train(save: str, data, *extra: str) -> str:
    prefix, tokenizer = data
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
               os.path.join(REPO, "pretrain_lime.py"), "--model", "lime-tiny", "--seq-length", "32",
               "--data-path", prefix, "--tokenizer-model", tokenizer, "--save", save, "--train-iters", "6",
               "--micro-batch-size", "2", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "3",
               "--eval-iters", "1", "--num-workers", "0", "--lr", "3e-3", "--split", "90,10,0", *extra]
    result = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers import make_tiny_pretraining_data

    root = tmp_path_factory.mktemp("evaluation")
    data = make_tiny_pretraining_data(str(root / "data"), num_docs=60)
    data_dir = root / "eval_data"
    write_synthetic_tasks(data_dir, TASKS, n=6)
    texts = ["The quick river ran past the stone window and the green field in winter. " * 3,
             "Paper and glass; metal and bread. A small round cloud over the north tower.",
             "Simple music in the market, bright light on the orange table."]
    write_hub_dataset(data_dir, "lime-tests/tiny_text", {None: {"test": [
        {"prompt": t[:30], "answer": t[30:40], "text": t} for t in texts]}})
    include = root / "own_tasks"
    include.mkdir()
    for name, text in OWN_TASKS.items():
        (include / name).write_text(text)
    plain = train(str(root / "plain"), data)
    with_tasks = train(str(root / "with_tasks"), data, "--eval-tasks", "piqa", "arc_easy", "--eval-tasks-interval",
                       "3", "--eval-tasks-limit", "4", "--eval-tasks-data-dir", str(data_dir))
    hf = root / "hf"
    assert load_tool("convert_to_hf").main(["--load", str(root / "plain"), "--output", str(hf), "--dtype", "fp32"]) == 0
    return dict(root=root, data=data, data_dir=data_dir, include=include, plain=plain, with_tasks=with_tasks, hf=hf)


def evaluate(*args: str) -> int:
    return load_tool("evaluate").main(list(args))


def records(run_dir) -> list[dict]:
    from megatron_lime.metrics_file import read_metrics

    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def test_in_training_evaluation_leaves_the_losses_unchanged(setup):
    plain = [(r["iteration"], r["loss"], r.get("grad_norm")) for r in records(setup["root"] / "plain")
             if r["kind"] in ("train", "valid")]
    with_tasks = records(setup["root"] / "with_tasks")
    assert [(r["iteration"], r["loss"], r.get("grad_norm")) for r in with_tasks
            if r["kind"] in ("train", "valid")] == plain
    assert len(plain) == 6 + 3  # a train line per step, validations at 0, 3 and 6
    tasks = [r for r in with_tasks if r["kind"] == "tasks"]
    assert [r["iteration"] for r in tasks] == [3, 6]
    for record in tasks:
        assert set(record["scores"]) == {"piqa", "arc_easy"}
        # 4 samples per task in all, 2 on each rank: lm-eval split them and the results were gathered.
        assert record["n_samples"] == {"piqa": 4, "arc_easy": 4}
        assert "acc_norm_stderr" in record["metrics"]["piqa"]
    assert "task scores at iteration 6 | piqa acc_norm" in setup["with_tasks"]
    from megatron_lime.conversion import load_lime_weights

    for name, tensor in load_lime_weights(setup["root"] / "plain").state_dict.items():
        assert torch.equal(tensor, load_lime_weights(setup["root"] / "with_tasks").state_dict[name]), name


def test_evaluate_runs_on_every_task_from_a_deepspeed_checkpoint(setup, tmp_path):
    out, chart = tmp_path / "results.json", tmp_path / "chart.png"
    assert evaluate("--load", str(setup["root"] / "plain"), "--tasks", ",".join(TASKS), "--limit", "5",
                    "--batch-size", "4", "--data-dir", str(setup["data_dir"]), "--output", str(out),
                    "--chart", str(chart)) == 0
    results = json.loads(out.read_text())
    assert results["iteration"] == 6 and results["consumed_tokens"] == 6 * 8 * 32
    assert results["lm_eval_version"].startswith("0.4.") and results["dtype"] == "float32"
    assert list(results["tasks"]) == TASKS
    for task, entry in results["tasks"].items():
        assert entry["n_samples"] == 5 and entry["n_total"] == 6, task
        metric = entry["score_metric"]
        assert metric == ("acc" if task in ("winogrande", "boolq") else "acc_norm"), task
        assert 0.0 <= entry["score"] <= 1.0 and f"{metric}_stderr" in entry["metrics"], task
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


def lm_eval_hf(setup, tasks: list[str], limit: int) -> dict:
    """lm-eval's own Hugging Face model (what `--model hf --model_args pretrained=DIR,trust_remote_code=True`
    builds)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from megatron_lime.evaluation import local_datasets

    model = AutoModelForCausalLM.from_pretrained(str(setup["hf"]), trust_remote_code=True, dtype=torch.float32)
    # The export's generation_config.json is the card's (beam search, 128 new tokens, repetition
    # penalties), which transformers applies to every generate call: compare plain greedy decoding.
    model.generation_config = GenerationConfig(eos_token_id=model.config.eos_token_id,
                                               pad_token_id=model.config.pad_token_id)
    tokenizer = AutoTokenizer.from_pretrained(str(setup["hf"]), trust_remote_code=True)
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu")
    with local_datasets(str(setup["data_dir"])):
        return lm_eval.simple_evaluate(model=hf, tasks=tasks, limit=limit, log_samples=True, bootstrap_iters=1000,
                                       task_manager=TaskManager(include_path=str(setup["include"])))


def test_same_scores_and_loglikelihoods_as_lm_eval_hf_model(setup, tmp_path):
    """The issue's test: our adapter and lm-eval's `--model hf` on the export agree within 1e-4 in fp32."""
    tasks = ["hellaswag", "arc_easy", "piqa", "winogrande", "boolq", "lime_tiny_generate", "lime_tiny_perplexity"]
    out = tmp_path / "results.json"
    assert evaluate("--load", str(setup["hf"]), "--tasks", ",".join(tasks), "--limit", "6", "--batch-size", "4",
                    "--data-dir", str(setup["data_dir"]), "--include-path", str(setup["include"]), "--log-samples",
                    "--output", str(out)) == 0
    ours = json.loads(out.read_text())
    theirs = lm_eval_hf(setup, tasks, 6)
    for task in tasks:
        our_samples = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        their_samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(our_samples) == len(their_samples) > 0, task
        for a, b in zip(our_samples, their_samples):
            assert a["arguments"] == [list(x) if isinstance(x, tuple) else x for x in b["arguments"]] or \
                json.dumps(a["arguments"], default=str) == json.dumps(b["arguments"], default=str), task
            for (ours_resp,), (their_resp,) in zip(a["resps"], b["resps"]):
                if task == "lime_tiny_generate":
                    assert ours_resp == their_resp, (task, ours_resp, their_resp)
                elif task == "lime_tiny_perplexity":
                    assert abs(ours_resp - their_resp) < 1e-4, (task, ours_resp, their_resp)
                else:  # (log-likelihood, is greedy)
                    assert abs(ours_resp[0] - their_resp[0]) < 1e-4 and ours_resp[1] == their_resp[1], task
        their_metrics = {k.split(",")[0]: v for k, v in theirs["results"][task].items() if "," in k}
        for metric, value in ours["tasks"][task]["metrics"].items():
            if value is not None and "stderr" not in metric:
                # relative: a perplexity of 2e7 from the same log-likelihoods summed in another order differs by
                # ~1e-7 of itself
                assert value == pytest.approx(their_metrics[metric], rel=1e-6, abs=1e-6), (task, metric)


def test_batching_and_padding_do_not_change_scores(setup, tmp_path):
    from megatron_lime.evaluation import LimeLM

    lm1 = LimeLM(load=str(setup["hf"]), batch_size=1)
    lm5 = LimeLM(load=str(setup["hf"]), batch_size=5, model=None)
    texts = ["The river", "A small round cloud over", "Paper", "Glass and metal and bread in the market", "North"]
    requests = [((t, " stone"), lm1.tok_encode(t), lm1.tok_encode(" stone window")) for t in texts]
    one = lm1._loglikelihood_tokens(requests, disable_tqdm=True)
    five = lm5._loglikelihood_tokens(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(one, five):
        assert abs(a - b) < 1e-5 and greedy_a == greedy_b
    # A request scored alone equals the same request in a batch padded to a longer one.
    alone = lm1._loglikelihood_tokens(requests[2:3], disable_tqdm=True)[0][0]
    assert abs(alone - five[2][0]) < 1e-5
    # The same weights read from the DeepSpeed checkpoint (2 ranks) and from a consolidated copy score the same.
    from megatron_lime.conversion import load_lime_weights, write_consolidated

    weights = load_lime_weights(setup["root"] / "plain")
    write_consolidated(tmp_path / "consolidated", weights.state_dict, weights.metadata)
    for source in (setup["root"] / "plain", tmp_path / "consolidated"):
        scores = LimeLM(load=str(source), batch_size=5)._loglikelihood_tokens(requests, disable_tqdm=True)
        assert all(abs(a - b) < 1e-5 for (a, _), (b, _) in zip(scores, one)), source


def test_missing_data_and_unknown_tasks_are_one_line_errors(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate("--load", str(setup["hf"]), "--tasks", "arc_easy", "--data-dir", str(empty),
                    "--output", str(tmp_path / "r.json")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{empty}/allenai/ai2_arc: missing" in err and "huggingface-cli download" in err
    output = str(tmp_path / "r.json")
    assert evaluate("--load", str(setup["hf"]), "--tasks", "no_such_task", "--output", output) == 1
    assert "unknown lm-eval task(s): no_such_task" in capsys.readouterr().err
    assert evaluate("--load", str(tmp_path / "nowhere"), "--tasks", "arc_easy", "--output", output) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_report_renders_the_real_runs(setup, tmp_path):
    from megatron_lime.evaluation.report import run_series

    report = load_tool("report")
    out = tmp_path / "report"
    assert report.main([str(setup["root"] / "plain"), str(setup["root"] / "with_tasks"), "--output", str(out)]) == 0
    for name in ("loss", "lr", "grad_norm", "throughput", "task_scores", "final_scores"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"({name}.png)" in (out / "report.md").read_text()
    assert not (out / "mfu.png").exists()  # CPU runs have no MFU
    series = run_series(records(setup["root"] / "with_tasks"))
    assert series["train_loss"][0] == [i * 8 * 32 for i in range(1, 7)]
    assert series["valid_loss"][0] == [0, 3 * 256, 6 * 256]
    assert series["task/piqa"][0] == [3 * 256, 6 * 256] and len(series["lr"][1]) == 6
    assert series["valid_loss"][1][-1] < series["valid_loss"][1][0]
    text = (out / "report.md").read_text()
    assert "| plain | 6 | 1,536 |" in text and "| piqa |" in text
