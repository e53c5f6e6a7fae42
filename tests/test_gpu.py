"""GPU tests (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine): every
attention backend against an fp32 reference and each other, a packed batch against its documents
run alone, and bf16 DeepSpeed ZeRO-1 steps of lime-tiny through the training loop's own step on
pretraining and packed SFT batches. The layout of the benchmark's packed SFT batch is checked on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import typing

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/ (whose packed SFT batch these tests use) is not a package

from benchmarks.bench_gpu_train import packed_sft_batch  # noqa: E402
from megatron_lime.config import LimeConfig  # noqa: E402
from megatron_lime.model import LimeModel  # noqa: E402
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def attention_backends() -> list[str]:
    """Every attention_backend LimeConfig accepts, but "auto" (which picks one of them)."""
    choices = typing.get_args(typing.get_type_hints(LimeConfig)["attention_backend"])
    return [choice for choice in choices if choice != "auto"]


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
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    gradients = torch.cat([parameter.grad.float().flatten() for parameter in model.parameters()])
    return [output.logits.detach().float(), output.loss.detach().float(), gradients]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def test_packed_sft_batch_has_the_sft_dataset_layout():
    """The benchmark's packed batch: positions restart per document, the prompts carry no loss."""
    config = LimeConfig.from_name("lime-tiny")
    batch = packed_sft_batch(config, 3, 128, torch.device("cpu"), torch.Generator().manual_seed(0), longest=48)
    for row in range(3):
        documents = batch["document_ids"][row]
        starts = torch.cat((torch.tensor([True]), documents[1:] != documents[:-1]))
        assert torch.equal(batch["position_ids"][row][starts], torch.zeros(int(starts.sum()), dtype=torch.long))
        assert torch.all(documents[1:] >= documents[:-1]) and int(starts.sum()) >= 2
        trained = batch["loss_mask"][row] > 0
        assert torch.equal(trained, batch["labels"][row] != -100) and 0 < int(trained.sum()) < 128
    output = LimeModel(config)(**batch, loss_reduction="sum")
    assert torch.isfinite(output.loss) and output.num_loss_tokens == batch["loss_mask"].sum()


@cuda_only
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_attention_backends_agree_cuda(packed):
    """Each backend in bf16 is as close to an fp32 SDPA reference as SDPA in bf16 is (2x, plus 1e-3)."""
    torch.manual_seed(0)
    reference = LimeModel(small_config(attention_backend="sdpa")).cuda()
    batch = packed_inputs(reference.config, "cuda")
    if not packed:
        batch = {name: batch[name] for name in ("input_ids", "labels")}
    want = loss_and_grads(reference, batch)
    errors: dict[str, list[float]] = {}
    for backend in attention_backends():
        if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
            continue  # not installed: the other backends are still compared
        model = LimeModel(small_config(attention_backend=backend)).cuda()
        model.load_state_dict(reference.state_dict())
        got = loss_and_grads(model.to(torch.bfloat16), batch)
        errors[backend] = [relative_error(g, w) for g, w in zip(got, want)]
    assert "sdpa" in errors, attention_backends()
    for backend, backend_errors in errors.items():
        for index, (error, sdpa_error) in enumerate(zip(backend_errors, errors["sdpa"])):
            assert error <= 2 * sdpa_error + 1e-3, (backend, index, error, sdpa_error, errors)
        assert max(backend_errors) < 5e-2, (backend, backend_errors)  # bf16, not garbage


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_documents_equal_the_documents_alone_cuda(dtype):
    """With document ids and restarting positions, a packed document's logits are those it has alone."""
    torch.manual_seed(0)
    model = LimeModel(small_config()).cuda().to(dtype)
    batch = packed_inputs(model.config, "cuda")
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
from benchmarks.bench_gpu_train import packed_sft_batch, pretraining_batch
from megatron_lime import kernels
from megatron_lime.training.config import parse_training_args
from megatron_lime.training.pretrain import build_model, init_distributed, train_step
from megatron_lime.training.wrap import wrap_model

args = parse_training_args(["--model", "lime-tiny", "--seq-length", "128", "--train-iters", "100",
                            "--micro-batch-size", "4", "--global-batch-size", "8", "--bf16", "--lr", "3e-3",
                            "--lr-warmup-iters", "0", "--zero-stage", "1"])
env = init_distributed()
engine, ds_config = wrap_model(build_model(args.model, 1234, env.device), args, env.device, env.world_size)
engine.train()
generator = torch.Generator().manual_seed(0)
pretrain = [pretraining_batch(args.model, 4, 128, env.device, generator) for _ in range(2)]
packed = [packed_sft_batch(args.model, 4, 128, env.device, generator, longest=48) for _ in range(2)]
results = {"pretrain": [], "packed": [], "packed_tokens": int(sum(b["loss_mask"].sum() for b in packed))}
for name, batches, steps in (("pretrain", pretrain, 20), ("packed", packed, 20)):
    for _ in range(steps):
        result = train_step(engine, batches, 3e-3, env.device)
        results[name].append([result.loss, result.trained_tokens, result.skipped])
results["param_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
results["zero_stage"] = ds_config["zero_optimization"]["stage"]
results["bf16"] = ds_config["bf16"]["enabled"]
results["kernels"] = kernels.backend("cuda")
print("RESULTS " + json.dumps(results))
'''


@cuda_only
def test_deepspeed_zero1_bf16_steps_on_pretraining_and_packed_sft_batches_cuda(tmp_path):
    """lime-tiny, bf16 ZeRO-1 on one GPU through training.pretrain.train_step (two micro-batches a step)."""
    script = tmp_path / "zero1_steps.py"
    script.write_text(ZERO1_STEPS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")][-1]
    results = json.loads(line.removeprefix("RESULTS "))
    assert results["param_dtypes"] == ["torch.bfloat16"] and results["bf16"] and results["zero_stage"] == 1
    assert results["kernels"] == "fused-cuda"
    for name in ("pretrain", "packed"):
        losses = [loss for loss, _, skipped in results[name]]
        assert not any(skipped for _, _, skipped in results[name]), results[name]
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert losses[-1] < losses[0] - 0.5, (name, losses)  # two fixed micro-batches are memorised
    assert {tokens for _, tokens, _ in results["packed"]} == {results["packed_tokens"]}
    assert {tokens for _, tokens, _ in results["pretrain"]} == {8 * 128}
