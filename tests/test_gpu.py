"""The GPU tests, each also run on the CPU (so the code they hold to the GPU cannot rot unseen between GPU
sessions; gpu_check/gpu_check.sh runs the CUDA ones on a GPU machine): every attention backend that trains on
the device against an fp32 reference and each other, a packed batch against its documents run alone, and
DeepSpeed ZeRO-1 steps of lime-tiny (bf16 on a GPU, fp32 on the CPU) through the training loop's own step on
pretraining and packed SFT batches. The layout of the benchmarks' packed SFT batch is checked too, and their step
timer's out-of-memory rows and its wait for the GPU check's build (bench_common run in a subprocess: no test imports
a benchmark)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import typing

import pytest
import torch

from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeModel

from helpers import run_with_benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")  # bench_common.py: the benchmarks' batches (a module, not a package)
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def attention_backends(device: str) -> list[str]:
    """Every attention_backend LimeConfig accepts but "auto" (which picks one of them) that trains on `device`
    (FlexAttention has no CPU backward; flash needs flash_attn and a GPU)."""
    choices = typing.get_args(typing.get_type_hints(LimeConfig)["attention_backend"])
    backends = [choice for choice in choices if choice != "auto"]
    if device == "cpu":
        return [backend for backend in backends if backend == "sdpa"]
    return [backend for backend in backends if backend != "flash" or importlib.util.find_spec("flash_attn")]


def small_config(**overrides) -> LimeConfig:
    """lime-tiny's depth and vocabulary with a head size of 64, as lime-1b has."""
    return LimeConfig.from_name("lime-tiny", hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                                max_position_embeddings=128, **overrides)


def packed_inputs(config: LimeConfig, device: str, lengths=(40, 70, 18), seq: int = 128) -> dict[str, torch.Tensor]:
    """One row holding documents of `lengths` tokens and a padding document, plus a plain row."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, config.vocab_size, (2, seq), generator=generator)
    position_ids = torch.arange(seq).repeat(2, 1)
    document_ids = torch.zeros(2, seq, dtype=torch.long)
    cursor = 0
    for document, n in enumerate(lengths):
        position_ids[0, cursor:cursor + n] = torch.arange(n)
        document_ids[0, cursor:cursor + n] = document
        cursor += n
    position_ids[0, cursor:] = torch.arange(seq - cursor)
    document_ids[0, cursor:] = len(lengths)
    batch = {"input_ids": input_ids, "labels": torch.roll(input_ids, -1, 1), "position_ids": position_ids,
             "document_ids": document_ids}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def loss_and_grads(model: LimeModel, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[logits, loss, every gradient] in fp32. With labels the model computes the loss in chunks and returns no
    logits: they come from a forward without labels."""
    with torch.no_grad():
        logits = model(**{name: tensor for name, tensor in batch.items() if name != "labels"}).logits
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    assert output.logits is None and model.config.loss_chunk_size  # the chunked loss, as training runs it
    output.loss.backward()
    gradients = torch.cat([parameter.grad.float().flatten() for parameter in model.parameters()])
    return [logits.detach().float(), output.loss.detach().float(), gradients]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


PACKED_BATCH = r'''
import json, sys
import torch
from bench_common import packed_batch
batch = packed_batch(int(sys.argv[1]), 3, 128, torch.device("cpu"), torch.Generator().manual_seed(0), longest=48)
print(json.dumps({name: {"values": tensor.tolist(), "dtype": str(tensor.dtype)} for name, tensor in batch.items()}))
'''


def test_packed_sft_batch_has_the_sft_dataset_layout():
    """The benchmarks' packed batch: positions restart per document, the prompts carry no loss."""
    config = LimeConfig.from_name("lime-tiny")
    batch = {name: torch.tensor(tensor["values"], dtype=getattr(torch, tensor["dtype"].removeprefix("torch.")))
             for name, tensor in run_with_benchmarks(PACKED_BATCH, str(config.vocab_size)).items()}
    for row in range(3):
        documents = batch["document_ids"][row]
        starts = torch.cat((torch.tensor([True]), documents[1:] != documents[:-1]))
        assert torch.equal(batch["position_ids"][row][starts], torch.zeros(int(starts.sum()), dtype=torch.long))
        assert torch.all(documents[1:] >= documents[:-1]) and int(starts.sum()) >= 2
        trained = batch["loss_mask"][row] > 0
        assert torch.equal(trained, batch["labels"][row] != -100) and 0 < int(trained.sum()) < 128
    output = LimeModel(config)(**batch, loss_reduction="sum")
    assert torch.isfinite(output.loss) and output.num_loss_tokens == batch["loss_mask"].sum()


TIMED_STEPS = r'''
import json, pathlib, sys, threading
import torch
from bench_common import timed_steps, wait_while
cpu = torch.device("cpu")

def out_of_memory():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

def wrapped():
    raise RuntimeError("BackendCompilerFailed: RuntimeError: CUDA error: out of memory")

results = {"oom": [timed_steps(step, 1, 2, cpu) for step in (out_of_memory, wrapped)], "raised": None}
try:
    timed_steps(lambda: int("x"), 1, 2, cpu)
except Exception as error:
    results["raised"] = type(error).__name__
marker = pathlib.Path(sys.argv[1])
marker.write_text("")
calls = []
threading.Timer(0.5, marker.unlink).start()
results["waited"] = timed_steps(lambda: calls.append(marker.exists()), 1, 2, cpu, str(marker))
results["calls"] = calls
results["waits_after"] = [wait_while(str(marker)), wait_while(None)]
print(json.dumps(results))
'''


def test_a_row_that_does_not_fit_says_oom_and_a_row_waits_for_the_build(tmp_path):
    """timed_steps: an out-of-memory error (torch's, or one torch.compile wraps as text) is the row's result, marked
    "oom", not raised, so the next row runs; any other error is raised. With a marker file (gpu_check.sh's running
    build), the timed steps start only once it is gone, after the warm-up, and the wait is not counted."""
    results = run_with_benchmarks(TIMED_STEPS, str(tmp_path / "build.running"))
    for result in results["oom"]:
        assert result["oom"] is True and result["error"].startswith("out of memory: "), result
    assert results["raised"] == "ValueError", results
    assert results["calls"] == [True, False, False]  # the warm-up beside the build, the timed steps after it
    result = results["waited"]
    assert result["waited_s"] >= 0.4 and result["wall_seconds_with_warmup"] < result["waited_s"], result
    assert max(results["waits_after"]) < 0.1, results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_attention_backends_agree(packed, device):
    """Each backend in bf16 is as close to an fp32 SDPA reference as SDPA in bf16 is (2x, plus 1e-3)."""
    torch.manual_seed(0)
    reference = LimeModel(small_config(attention_backend="sdpa")).to(device)
    batch = packed_inputs(reference.config, device)
    if not packed:
        batch = {name: batch[name] for name in ("input_ids", "labels")}
    want = loss_and_grads(reference, batch)
    errors: dict[str, list[float]] = {}
    for backend in attention_backends(device):
        model = LimeModel(small_config(attention_backend=backend)).to(device)
        model.load_state_dict(reference.state_dict())
        got = loss_and_grads(model.to(torch.bfloat16), batch)
        errors[backend] = [relative_error(g, w) for g, w in zip(got, want)]
    assert "sdpa" in errors, attention_backends(device)
    for backend, backend_errors in errors.items():
        for index, (error, sdpa_error) in enumerate(zip(backend_errors, errors["sdpa"])):
            assert error <= 2 * sdpa_error + 1e-3, (backend, index, error, sdpa_error, errors)
        assert max(backend_errors) < 5e-2, (backend, backend_errors)  # bf16, not garbage


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_documents_equal_the_documents_alone(dtype, device):
    """With document ids and restarting positions, a packed document's logits are those it has alone."""
    torch.manual_seed(0)
    model = LimeModel(small_config()).to(device).to(dtype)
    batch = packed_inputs(model.config, device)
    with torch.no_grad():
        packed = model(batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                       document_ids=batch["document_ids"][:1]).logits[0].float()
        cursor = 0
        for n in (40, 70, 18):
            alone = model(batch["input_ids"][:1, cursor:cursor + n]).logits[0].float()
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # other kernels, other summation orders
            assert relative_error(packed[cursor:cursor + n], alone) < tolerance, (dtype, cursor, n)
            cursor += n


ZERO1_STEPS = r'''
import json, math, sys
import torch
from bench_common import packed_batch, pretraining_batch
from megatron_lime import kernels
from megatron_lime.training.config import parse_training_args
from megatron_lime.training.distributed import init_distributed
from megatron_lime.training.pretrain import build_model, train_step
from megatron_lime.training.wrap import wrap_model

bf16 = torch.cuda.is_available()
args = parse_training_args(["--model", "lime-tiny", "--seq-length", "128", "--train-iters", "100",
                            "--micro-batch-size", "4", "--global-batch-size", "8", "--bf16" if bf16 else "--no-bf16",
                            "--lr", "3e-3", "--lr-warmup-iters", "0", "--zero-stage", "1"])
env = init_distributed()
engine, ds_config = wrap_model(build_model(args.model, 1234, env.device), args, env.device, env.world_size)
engine.train()
generator = torch.Generator().manual_seed(0)
pretrain = [pretraining_batch(args.model.vocab_size, 4, 128, env.device, generator) for _ in range(2)]
packed = [packed_batch(args.model.vocab_size, 4, 128, env.device, generator, longest=48) for _ in range(2)]
results = {"pretrain": [], "packed": [], "packed_tokens": int(sum(b["loss_mask"].sum() for b in packed))}
for name, batches, steps in (("pretrain", pretrain, 20), ("packed", packed, 20)):
    for _ in range(steps):
        result = train_step(engine, batches, 3e-3, env.device)
        results[name].append([result.loss, result.trained_tokens, result.skipped])
results["param_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
results["zero_stage"] = ds_config["zero_optimization"]["stage"]
results["bf16"] = ds_config["bf16"]["enabled"]
results["kernels"] = kernels.backend(env.device.type)
results["optimizer"] = type(engine.optimizer).__name__
print("RESULTS " + json.dumps(results))
'''


@pytest.mark.parametrize("device", DEVICES)
def test_deepspeed_zero1_steps_on_pretraining_and_packed_sft_batches(tmp_path, device):
    """lime-tiny, ZeRO-1 through training.pretrain.train_step (two micro-batches a step): bf16 on one GPU, fp32 on
    the CPU."""
    script = tmp_path / "zero1_steps.py"
    script.write_text(ZERO1_STEPS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, BENCHMARKS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                              if p])
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")][-1]
    results = json.loads(line.removeprefix("RESULTS "))
    bf16 = device == "cuda"
    assert results["param_dtypes"] == (["torch.bfloat16"] if bf16 else ["torch.float32"])
    assert results["bf16"] is bf16 and results["zero_stage"] == 1
    if bf16:
        assert results["kernels"] == "fused-cuda"
    for name in ("pretrain", "packed"):
        losses = [loss for loss, _, skipped in results[name]]
        assert not any(skipped for _, _, skipped in results[name]), results[name]
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert losses[-1] < losses[0] - 0.5, (name, losses)  # two fixed micro-batches are memorised
    assert {tokens for _, tokens, _ in results["packed"]} == {results["packed_tokens"]}
    assert {tokens for _, tokens, _ in results["pretrain"]} == {8 * 128}
