"""torch.compile of the blocks (--torch-compile) with the fused custom ops (torch.ops.lime.*) and DeepSpeed:
no graph break inside a block for every attention mask kind, and the real training step (DeepSpeed ZeRO-1, one
process, lime-tiny, fp32) gives the eager losses over 10 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lime import kernels
from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeBlock
from megatron_lime.model.attention import document_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENT_IDS = torch.tensor([[0] * 5 + [1] + [2] * 10, [0] * 16])  # (2, 16): a length-1 document, an unpacked row


@pytest.mark.parametrize("mask_kind", ["causal", "sdpa", "flex"])
def test_a_block_compiles_without_graph_breaks(mask_kind):
    torch.manual_seed(0)
    block = LimeBlock(LimeConfig.from_name("lime-tiny"))
    x = torch.randn(2, 16, 64, requires_grad=mask_kind != "flex")  # FlexAttention has no CPU backward
    delta = torch.randn(2, 16, 64)  # the previous block's MLP output, added by this block's first norm
    mask = None if mask_kind == "causal" else document_mask(mask_kind, x, DOCUMENT_IDS)
    torch._dynamo.reset()
    with torch.set_grad_enabled(mask_kind != "flex"):
        explanation = torch._dynamo.explain(block)(x, mask, delta)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # The fused kernels are in the graph as custom ops (inside the autograd.Function's forward body).
    graph_code = "\n".join(m.code for g in explanation.graphs for m in g.modules() if hasattr(m, "code"))
    if kernels.backend() != "reference":
        assert "lime.add_rms_norm_fwd" in graph_code and "lime.silu_fwd" in graph_code, graph_code
    if mask_kind == "causal":
        return
    # A new batch (other document boundaries) reuses the graph: the mask's tensors are inputs, not constants.
    compiled = torch.compile(block, backend="eager")
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.set_grad_enabled(mask_kind != "flex"):
        for document_ids in (DOCUMENT_IDS, DOCUMENT_IDS.flip(1), torch.zeros_like(DOCUMENT_IDS)):
            compiled(x, document_mask(mask_kind, x, document_ids))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    torch._dynamo.reset()


RUNNER = r'''
import json, sys
import torch
from megatron_lime.training.config import parse_training_args
from megatron_lime.training.distributed import init_distributed
from megatron_lime.training.pretrain import build_model, train_step
from megatron_lime.training.wrap import wrap_model

env = init_distributed()
losses = {}
for variant in ("eager", "compiled"):
    flags = ["--model", "lime-tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "10", "--lr", "3e-3", "--lr-warmup-iters", "0", "--no-bf16"]
    args = parse_training_args(flags + (["--torch-compile"] if variant == "compiled" else []))
    engine, _ = wrap_model(build_model(args.model, args.training.seed, env.device), args, env.device, 1)
    engine.train()
    # The same two micro-batches every step, memorised: the loss falls, so the comparison covers real updates.
    g = torch.Generator().manual_seed(7)
    micro_batches = []
    for k in range(2):
        tokens = torch.randint(0, 512, (2, 33), generator=g)
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32)}
        if k == 1:  # a packed micro-batch: documents of 7, 1 and 24 tokens, positions restarting
            batch["document_ids"] = torch.tensor([0] * 7 + [1] + [2] * 24).expand(2, 32)
            batch["position_ids"] = torch.cat([torch.arange(7), torch.arange(1), torch.arange(24)]).expand(2, 32)
        micro_batches.append(batch)
    losses[variant] = []
    for step in range(10):
        losses[variant].append(train_step(engine, micro_batches, 3e-3, env.device).loss)
    losses[variant + "_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
torch.distributed.destroy_process_group()
print("LOSSES " + json.dumps(losses))
'''


def test_compiled_blocks_train_like_eager_through_deepspeed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", RUNNER], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    line = next(text for text in done.stdout.splitlines() if text.startswith("LOSSES "))
    losses = json.loads(line[len("LOSSES "):])
    eager, compiled = losses["eager"], losses["compiled"]
    assert eager[-1] < eager[0] - 0.5  # it learns: the steps are real updates
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-5, atol=0)
    assert losses["eager_graphs"] == 0
    # For the causal micro-batch and for the packed one (dense mask): one graph for the first block (no MLP output of
    # a block before it to add) and one shared by the later blocks: no recompilation per step or per later layer.
    assert 2 <= losses["compiled_graphs"] <= 4, losses
