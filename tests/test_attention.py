"""Document-masked attention: FlexAttention block masks and flash-attn's varlen path against the SDPA-mask
path, forward and backward, on odd shapes with several documents (a length-1 one) and padding; the masks are
built once per batch; the automatic choice. CUDA cases run where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeModel
from megatron_lime.model import attention as attention_module
from megatron_lime.model.attention import (attention_backend_for, cu_seqlens_from_document_ids,
                                           document_attention_mask, document_block_mask, document_mask)

# 3 rows of 37 tokens: four documents (one of length 1); one document; documents, a length-1 one, then padding
# (the SFT packer gives padding one more id, so it attends only to itself).
LENGTHS = [[5, 1, 20, 11], [37], [12, 9, 1, 15]]
SEQ = 37


def packed_document_ids() -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in LENGTHS]
    return torch.stack(rows)  # (3, 37)


def packed_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    index = torch.arange(document_ids.shape[1]).expand_as(document_ids)
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


def qkv(b=3, h=3, s=SEQ, d=16, dtype=torch.float32, device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]


def outputs_and_grads(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out) + out.detach().cos())
    return [out, *grads]


def test_cu_seqlens_one_sequence_per_run_rows_never_join():
    document_ids = torch.tensor([[0, 0, 1, 2, 2], [2, 2, 2, 3, 3], [7, 7, 7, 7, 7]])
    cu_seqlens, max_seqlen = cu_seqlens_from_document_ids(document_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 2, 3, 5, 8, 10, 15] and max_seqlen == 5
    cu_seqlens, max_seqlen = cu_seqlens_from_document_ids(packed_document_ids())
    assert cu_seqlens.tolist() == [0, 5, 6, 26, 37, 74, 86, 95, 96, 111] and max_seqlen == 37


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_the_dense_mask_forward_and_backward(monkeypatch):
    """Eager FlexAttention (torch's reference math, forward and backward) with our block mask == SDPA + dense mask."""
    from torch.nn.attention import flex_attention as flex_module

    # FlexAttention refuses CPU backward outright; its eager path is plain autograd math, fine for a reference.
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    document_ids = packed_document_ids()
    block_mask = document_block_mask(document_ids)
    dense = document_attention_mask(document_ids)
    inputs = qkv()
    flex = outputs_and_grads(lambda q, k, v: flex_module.flex_attention(q, k, v, block_mask=block_mask), inputs)
    sdpa = outputs_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), inputs)
    for got, expected in zip(flex, sdpa):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiled_flex_model_equals_sdpa_model_on_a_packed_batch():
    """The model's flex path (block mask from the forward, compiled flex_attention) gives the SDPA-mask logits.

    CPU: forward only (FlexAttention has no CPU backward); the compiled kernel skips whole blocks, so this
    also checks the block mask's full/partial block lists, not only the mask function.
    """
    torch.manual_seed(0)
    sdpa_model = LimeModel(LimeConfig.from_name("lime-tiny", attention_backend="sdpa")).eval()
    flex_model = LimeModel(LimeConfig.from_name("lime-tiny", attention_backend="flex")).eval()
    flex_model.load_state_dict(sdpa_model.state_dict())
    document_ids = packed_document_ids()
    batch = dict(input_ids=torch.randint(0, 512, document_ids.shape, generator=torch.Generator().manual_seed(1)),
                 position_ids=packed_position_ids(document_ids), document_ids=document_ids)
    with torch.no_grad():
        expected = sdpa_model(**batch).logits
        got = flex_model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A length-1 document sees only itself: its logits are those of the token alone at position 0.
    with torch.no_grad():
        alone = sdpa_model(batch["input_ids"][:1, 5:6]).logits
    torch.testing.assert_close(got[:1, 5:6], alone, rtol=1e-5, atol=1e-5)


def fake_flash_attn(calls: list):
    """flash_attn_qkvpacked_func / flash_attn_varlen_qkvpacked_func by their documented semantics, on SDPA (to
    test our side on CPU)."""

    def flash_attn_qkvpacked_func(qkv, causal):  # (b, s, 3, h, hd) -> (b, s, h, hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)

    def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, causal):  # (total, 3, h, hd) -> (total, h, hd)
        calls.append((cu_seqlens, max_seqlen))
        out = qkv.new_empty(qkv.shape[0], *qkv.shape[2:])
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            assert end - start <= max_seqlen
            out[start:end] = flash_attn_qkvpacked_func(qkv[None, start:end], causal)[0]
        return out

    return flash_attn_qkvpacked_func, flash_attn_varlen_qkvpacked_func


def test_flash_varlen_path_computes_cu_seqlens_once_per_batch_and_equals_sdpa(monkeypatch):
    calls, cu_seqlens_calls = [], []
    monkeypatch.setattr(attention_module, "_flash_attn", lambda: fake_flash_attn(calls))
    monkeypatch.setattr(attention_module, "flash_usable", lambda x: True)
    real_cu_seqlens = attention_module.cu_seqlens_from_document_ids
    monkeypatch.setattr(attention_module, "cu_seqlens_from_document_ids",
                        lambda ids: cu_seqlens_calls.append(1) or real_cu_seqlens(ids))
    torch.manual_seed(0)
    config = LimeConfig.from_name("lime-tiny", num_layers=3)
    model = LimeModel(config)
    document_ids = packed_document_ids()
    batch = dict(input_ids=torch.randint(0, 512, document_ids.shape), labels=torch.randint(0, 512, document_ids.shape),
                 position_ids=packed_position_ids(document_ids), document_ids=document_ids)
    model(**batch).loss.backward()
    flash_grads = [p.grad.clone() for p in model.parameters()]
    assert len(cu_seqlens_calls) == 1 and len(calls) == 3  # once per batch, used by each of the 3 layers
    assert all(c[0] is calls[0][0] for c in calls)
    model.zero_grad()
    config.attention_backend = "sdpa"
    model(**batch).loss.backward()
    for got, expected in zip(flash_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_masks_are_built_once_per_batch_not_per_layer(monkeypatch):
    built = []
    real = attention_module.document_attention_mask
    monkeypatch.setattr(attention_module, "document_attention_mask", lambda ids: built.append(1) or real(ids))
    model = LimeModel(LimeConfig.from_name("lime-tiny", num_layers=3))
    document_ids = packed_document_ids()
    model(torch.zeros_like(document_ids), document_ids=document_ids)
    assert len(built) == 1


def test_automatic_choice_on_cpu_and_clear_errors():
    x = torch.randn(2, 8, 64, requires_grad=True)
    assert attention_backend_for("auto", x, packed=True) == "sdpa"
    assert attention_backend_for("auto", x, packed=False) == "sdpa"
    assert document_mask("auto", x, None) is None
    assert document_mask("auto", x, torch.zeros(2, 8, dtype=torch.long)).backend == "sdpa"
    with pytest.raises(RuntimeError, match="needs flash-attn installed"):
        attention_backend_for("flash", x, packed=True)
    with pytest.raises(RuntimeError, match="inference only"):
        attention_backend_for("flex", x, packed=True)
    with torch.no_grad():
        assert attention_backend_for("flex", x.detach(), packed=True) == "flex"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_flex_equals_sdpa_mask_forward_and_backward(dtype):
    document_ids = packed_document_ids().cuda()
    block_mask = document_block_mask(document_ids)
    dense = document_attention_mask(document_ids)
    inputs = qkv(h=4, d=64, dtype=dtype, device="cuda")
    flex = outputs_and_grads(lambda q, k, v: attention_module.compiled_flex_attention()(q, k, v, block_mask=block_mask),
                             inputs)
    sdpa = outputs_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), inputs)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, expected in zip(flex, sdpa):
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)


@cuda
def test_cuda_auto_picks_flex_for_packed_batches_and_the_model_trains():
    x = torch.randn(2, 8, 64, device="cuda", requires_grad=True)
    expected = "flash" if attention_module.flash_usable(x) else "flex"
    assert attention_backend_for("auto", x, packed=True) == expected
    torch.manual_seed(0)
    model = LimeModel(LimeConfig.from_name("lime-tiny", attention_backend="flex")).cuda()
    reference = LimeModel(LimeConfig.from_name("lime-tiny", attention_backend="sdpa")).cuda()
    reference.load_state_dict(model.state_dict())
    document_ids = packed_document_ids().cuda()
    batch = dict(input_ids=torch.randint(0, 512, document_ids.shape, device="cuda"), labels=document_ids * 3,
                 position_ids=packed_position_ids(document_ids), document_ids=document_ids)
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


class _OpLog(TorchDispatchMode):
    """The aten ops run inside the mode, with their output shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func.overloadpacket), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_sdpa_backward_writes_the_qkv_gradient_with_one_copy(packed):
    """q, k, v are views of the fused projection; their gradients are stacked into its layout once, never copied
    again (the permute-then-unbind form cost an extra clone of the whole (b, s, 3, h, hd) gradient)."""
    config = LimeConfig.from_name("lime-tiny")
    attention = attention_module.CausalSelfAttention(config)
    x = torch.randn(2, 16, config.hidden_size, requires_grad=True)
    document_ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 16]) if packed else None
    out = attention(x, attention_module.document_mask("sdpa", x, document_ids))
    with _OpLog() as log:
        out.sum().backward()
    qkv_sized = [(op, shape) for op, shape in log.ops
                 if shape is not None and math.prod(shape) == 2 * 16 * 3 * config.hidden_size]
    assert [op for op, _ in qkv_sized if op not in ("aten.view", "aten._unsafe_view", "aten.transpose", "aten.t")] == [
        "aten.stack"], qkv_sized
    assert ("aten.stack", (2, 16, 3, config.num_attention_heads, config.head_dim)) in qkv_sized
