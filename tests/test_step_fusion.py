"""The fast step, proven on the CPU: the fused loss chunk body (no graph break, compiled = eager = reference, bf16
as close to an fp64 truth as the materialised loss), the activations a block saves for its backward counted with
saved_tensors_hooks against the written-down arithmetic, the chunked loss saving only its two gradients, and a
training step that reads nothing back from the device (the loop reads the loss at log intervals only)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeBlock, LimeModel, chunked_language_model_loss, language_model_loss
from megatron_lime.model.loss import chunk_loss_and_logit_grad_, chunk_loss_and_logit_grad_in_place_
from op_log import OpLog


def chunk_inputs(c=37, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (c,), generator=g)
    weights = (torch.rand(c, generator=g) > 0.3).float()
    weights[5] = 0.25
    return logits, labels, weights


def reference_chunk(logits, labels, weights):
    """Autograd's own answer: the weighted cross-entropy and its gradient with respect to the logits."""
    x = logits.detach().double().requires_grad_()
    total = (F.cross_entropy(x, labels, reduction="none") * weights.double()).sum()
    total.backward()
    return total.detach(), x.grad


def test_the_fused_chunk_body_has_no_graph_break_and_compiles_to_the_reference():
    logits, labels, weights = chunk_inputs()
    explanation = torch._dynamo.explain(chunk_loss_and_logit_grad_)(logits.clone(), labels, weights)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(chunk_loss_and_logit_grad_, fullgraph=True, dynamic=False)
    want_total, want_grad = reference_chunk(logits, labels, weights)
    for body in (chunk_loss_and_logit_grad_, compiled, chunk_loss_and_logit_grad_in_place_):
        grad = logits.clone()
        total = body(grad, labels, weights)  # the logits become their gradient, in place
        torch.testing.assert_close(total.double(), want_total, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=1e-6 * want_grad.abs().max().item())
    for body in (compiled, chunk_loss_and_logit_grad_in_place_):  # bf16 logits: the gradient written back in bf16
        grad = logits.to(torch.bfloat16)
        body(grad, labels, weights)
        torch.testing.assert_close(grad.double(), want_grad, rtol=2e-2, atol=2e-2 * want_grad.abs().max().item())
    torch._dynamo.reset()


def test_chunked_loss_in_bf16_is_as_close_to_an_fp64_truth_as_the_materialised_loss():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 45, 32, generator=g)
    weight = torch.randn(211, 32, generator=g) * 0.3
    labels = torch.randint(0, 211, (2, 45), generator=g)
    labels[0, :5] = -100
    mask = (torch.rand(2, 45, generator=g) > 0.2).float()

    def run(loss_fn, dtype):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        loss, _ = loss_fn(h, w)
        loss.backward()
        return [loss.detach().double(), h.grad.double(), w.grad.double()]

    truth = run(lambda h, w: language_model_loss(F.linear(h, w), labels, mask, "sum"), torch.float64)
    materialised = run(lambda h, w: language_model_loss(F.linear(h, w), labels, mask, "sum"), torch.bfloat16)
    chunked = run(lambda h, w: chunked_language_model_loss(h, w, labels, mask, "sum", 16), torch.bfloat16)
    for got, reference, want in zip(chunked, materialised, truth):
        error = ((got - want).norm() / want.norm()).item()
        reference_error = ((reference - want).norm() / want.norm()).item()
        assert error <= 2 * reference_error + 1e-4, (error, reference_error)


def block_saved_bytes_per_token(config: LimeConfig, bytes_per_element: int) -> int:
    """What one LimeBlock saves for its backward per token (eager, causal SDPA), from the code:

    RMSNorm x2:  its input (d: the residual sum it formed) and rstd (one fp32)  2 d B + 2 x 4
    qkv linear:  its input, the normed x (d); q, k, v: views of its output (3 d), saved by SDPA
    SDPA:        its output (d, laid out (b, s, h, hd): out_proj's input is a view of it) and logsumexp (h fp32)
    MLP:         fc_in's input (d), SiLU's input (f), fc_out's input (f)
    = B (8 d + 2 f) + 4 (h + 2); the residual adds are the norms' and the weights are not activations.
    lime-1b in bf16: 2 (8 x 1536 + 2 x 6144) + 4 x 26 = 49,256 bytes (48.1 KiB) per token per layer, 0.75 GiB per
    512-token sequence over 32 layers: 12.0 GiB per 16 sequences (the first GPU call measured 12.2 GiB more peak
    memory at micro-batch 32 than at 16).
    """
    d, f, h = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    return bytes_per_element * (8 * d + 2 * f) + 4 * (h + 2)


def saved_bytes(module_call, parameters) -> tuple[int, list]:
    """Bytes of the distinct storages autograd saves during module_call(), parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, tuple] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = (storage.nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module_call()
    return sum(entry[0] for entry in storages.values()), sorted(storages.values(), key=lambda entry: -entry[0])


@pytest.mark.parametrize("dtype, bytes_per_element", [(torch.float32, 4), (torch.bfloat16, 2)], ids=["fp32", "bf16"])
def test_saved_bytes_per_token_of_a_block_equal_the_arithmetic(dtype, bytes_per_element):
    config = LimeConfig.from_name("lime-tiny", hidden_size=64, num_attention_heads=4, ffn_hidden_size=256)
    torch.manual_seed(0)
    block = LimeBlock(config).to(dtype)
    b, s = 2, 16
    x = torch.randn(b, s, config.hidden_size, dtype=dtype, requires_grad=True)
    delta = torch.randn(b, s, config.hidden_size, dtype=dtype, requires_grad=True)  # the previous block's MLP output
    total, storages = saved_bytes(lambda: block(x, None, delta), block.parameters())
    assert total == b * s * block_saved_bytes_per_token(config, bytes_per_element), storages
    assert block_saved_bytes_per_token(LimeConfig.from_name("lime-1b"), 2) == 49_256


def test_the_chunked_loss_saves_its_two_gradients_and_no_logits():
    config = LimeConfig.from_name("lime-tiny", loss_chunk_size=16)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 29, config.hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(config.vocab_size, config.hidden_size, generator=g, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (3, 29), generator=g)
    total, storages = saved_bytes(lambda: chunked_language_model_loss(hidden, weight, labels, None, "sum", 16), [])
    # dL/dhidden (b s, d) and dL/dW (vocab, d); the materialised loss would keep (b s, vocab) logits as well.
    assert total == 4 * (3 * 29 * config.hidden_size + config.vocab_size * config.hidden_size), storages


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """train_step and the log window keep the loss, the token count and the gradient norm on the device: any
    host read (.item(), float(), .tolist()) inside them fails this test."""
    from megatron_lime.training.metrics import StepWindow
    from megatron_lime.training.pretrain import StepResult, train_step

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model = LimeModel(LimeConfig.from_name("lime-tiny"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # its param_groups get the LR; the step is below

    class Engine:  # the DeepSpeed engine's surface that train_step uses, one rank, no accumulation
        dp_world_size = 1

        def __init__(self):
            self.optimizer = optimizer

        def __call__(self, **batch):
            return model(**batch)

        def backward(self, loss, scale_wrt_gas):
            loss.backward()

        def step(self):  # plain SGD (the DeepSpeed step's own reads are DeepSpeed's, not the loop's)
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.grad is not None:
                        parameter -= 1e-3 * parameter.grad
                        parameter.grad = None

        def get_global_grad_norm(self):
            return torch.tensor(1.5)

        def was_step_applied(self):
            return True

    tokens = torch.randint(0, 512, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}
    window = StepWindow(train_iters=1, tokens_per_step=32, world_size=1, flops_per_token=1.0, peak_tflops=None,
                        device=torch.device("cpu"))

    def refuse(*args, **kwargs):
        raise AssertionError("a host read inside the training step")

    with monkeypatch.context() as patch:
        for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
            patch.setattr(torch.Tensor, name, refuse)
        result = train_step(Engine(), [batch, batch], 1e-3, torch.device("cpu"))
        window.add(result, 0.1)
    assert isinstance(result, StepResult) and result.trained_tokens == 2 * 2 * 16
    assert window.loss == pytest.approx(result.loss) and window.grad_norm == 1.5


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_the_head_weight_gradient_is_written_once_per_micro_batch(autocast):
    """However many chunks, the (vocab, d) head gradient is produced by one GEMM (then, under autocast, the head
    weight is cast to bf16 once and the bf16 product widened to fp32 once): never re-read and re-written per chunk."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 32, generator=g, requires_grad=True)
    weight = (torch.randn(211, 32, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, 211, (2, 40), generator=g)

    def weight_sized_ops(chunk_size: int) -> list[str]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpLog() as log:
            loss, _ = chunked_language_model_loss(hidden, weight, labels, None, "mean", chunk_size)
        loss.backward()
        return [op for op, shape in log.ops if shape == tuple(weight.shape)]

    five_chunks, one_chunk = weight_sized_ops(16), weight_sized_ops(80)
    assert five_chunks == one_chunk
    assert five_chunks == (["aten._to_copy", "aten.mm", "aten._to_copy"] if autocast else ["aten.mm"])
    # and the same loss and gradients as the materialised logits under the same precision
    weight.grad = hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = chunked_language_model_loss(hidden, weight, labels, None, "mean", 16)
    loss.backward()
    got = (loss.detach(), hidden.grad, weight.grad)
    weight.grad = hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want_loss, _ = language_model_loss(F.linear(hidden, weight), labels, None, "mean")
    want_loss.backward()
    tolerance = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, (want_loss.detach(), hidden.grad, weight.grad)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tolerance)
