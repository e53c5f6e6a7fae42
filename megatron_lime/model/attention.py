"""Causal self-attention with a fused QKV projection, and the per-batch document masks of packed batches.

Backends, chosen once per batch by `document_mask` (config `attention_backend`, flag --attention-backend):

    flash  flash-attn (CUDA, bf16/fp16, when installed); packed batches use its varlen path with
           cu_seqlens computed once per batch (the one host sync, `max_seqlen`, happens there, not per layer).
    flex   FlexAttention with a block mask built once per batch from document_ids: blocks wholly outside
           a document or above the diagonal are skipped (fewer blocks than plain causal attention over the row).
           Compiled (torch.compile(flex_attention)): uncompiled it materialises the scores.
    sdpa   torch's scaled_dot_product_attention: is_causal for unpacked batches (its flash kernel on CUDA);
           packed batches pass a dense (b, 1, s, s) boolean mask, which rules out SDPA's flash kernel.

`auto` = flash where usable; else, for packed batches, flex on CUDA and sdpa on CPU (in torch 2.13
FlexAttention has no backward on CPU; its compiled CPU forward works, after 15 s or more of compilation).
Unpacked batches never need flex: SDPA's causal kernel is already the fast one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_lime.config import LimeConfig
from megatron_lime.model.linear import Linear

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _flash_attn():
    """The flash_attn module, or None when it is not installed."""
    try:
        from flash_attn import flash_attn_qkvpacked_func, flash_attn_varlen_qkvpacked_func
    except ImportError:
        return None
    return flash_attn_qkvpacked_func, flash_attn_varlen_qkvpacked_func


_compiled_flex_attention = None


def compiled_flex_attention():
    """torch.compile(flex_attention), made on first use (importing torch.compile's machinery costs seconds).

    Uncompiled, flex_attention materialises the scores. `document_mask` makes it before the blocks run, so
    inside a compiled block (--torch-compile) dynamo only reads it and traces into the same kernel: no graph
    break and no recompilation per batch.
    """
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (b, 1, s, s): True where query i may attend to key j (j <= i, same document)."""
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()  # (s, s)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (b, s, s)
    return (same_document & causal)[:, None]  # (b, 1, s, s)


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """FlexAttention BlockMask for (b, s) document ids: the same rule as document_attention_mask."""
    b, s = document_ids.shape

    def same_document_causal(batch, head, q_index, kv_index):
        return (q_index >= kv_index) & (document_ids[batch, q_index] == document_ids[batch, kv_index])

    # H=None: one mask shared by every head. Built once per batch (the model's forward), used by every layer.
    return create_block_mask(same_document_causal, b, None, s, s, device=document_ids.device)


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts (n_docs + 1,) int32 for flash-attn's varlen path, and the longest run.

    Every maximal run of equal ids within a row is one sequence; rows never join. The `.item()` here is a
    host sync: call it once per batch (the model's forward does), never per layer.
    """
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (b, s)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_positions = starts.flatten().nonzero().flatten()  # (n_docs,)
    total = torch.tensor([b * s], device=document_ids.device)
    cu_seqlens = torch.cat((start_positions, total)).to(torch.int32)  # (n_docs + 1,)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


def flash_usable(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _flash_attn() is not None


@dataclasses.dataclass(frozen=True)
class DocumentMask:
    """What every layer needs to attend within documents, built once per batch by `document_mask`.

    Exactly one of the three representations is set, the one of `backend`.
    """

    backend: str  # "flash", "flex" or "sdpa"
    dense: torch.Tensor | None = None  # sdpa: (b, 1, s, s) bool
    block_mask: BlockMask | None = None  # flex
    cu_seqlens: torch.Tensor | None = None  # flash: (n_docs + 1,) int32
    max_seqlen: int = 0  # flash: longest document (a Python int, as flash-attn wants: under torch.compile
    #                     each new value is a new specialisation of the block)


def attention_backend_for(requested: str, x: torch.Tensor, packed: bool) -> str:
    """The backend a batch uses: `requested` ("auto", "flash", "flex", "sdpa") resolved for x's device and dtype."""
    if requested == "flash" and not flash_usable(x):
        raise RuntimeError(
            "attention_backend='flash' needs flash-attn installed (pip install 'megatron-lime[gpu]') "
            f"and CUDA bf16/fp16 inputs; got device={x.device}, dtype={x.dtype}, "
            f"flash_attn installed={_flash_attn() is not None}")
    if requested == "flex" and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("attention_backend='flex' on CPU works for inference only: FlexAttention has no CPU "
                           "backward in this torch; use --attention-backend sdpa (or auto) to train on CPU")
    if requested == "auto":
        if flash_usable(x):
            return "flash"
        return "flex" if packed and x.is_cuda else "sdpa"
    return requested


def document_mask(requested_backend: str, x: torch.Tensor, document_ids: torch.Tensor | None) -> DocumentMask | None:
    """The per-batch attention mask for `document_ids` (b, s), or None for unpacked batches.

    x: the (b, s, d) block input (its device, dtype and requires_grad choose the backend).
    Unpacked batches on flex/sdpa return None (SDPA's causal kernel); flash returns a DocumentMask
    without cu_seqlens, so that every layer takes the flash path.
    """
    backend = attention_backend_for(requested_backend, x, document_ids is not None)
    if backend == "flash":
        if document_ids is None:
            return DocumentMask("flash")
        cu_seqlens, max_seqlen = cu_seqlens_from_document_ids(document_ids)
        return DocumentMask("flash", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if document_ids is None:
        return None
    if backend == "flex":
        compiled_flex_attention()  # made here, outside any compiled block
        return DocumentMask("flex", block_mask=document_block_mask(document_ids))
    return DocumentMask("sdpa", dense=document_attention_mask(document_ids))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LimeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: DocumentMask | None = None) -> torch.Tensor:
        """x: (b, s, d); mask: from `document_mask` (None: plain causal attention with SDPA)."""
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim)  # (b, s, 3, h, hd)
        if mask is not None and mask.backend == "flash":
            out = self._flash(qkv, mask)  # (b, s, h, hd)
        else:
            # Views of qkv: unbind the middle dimension, then swap s and h. The backward stacks the three
            # gradients straight into qkv's (b, s, 3, h, hd) layout (one copy); permuting first and unbinding
            # dimension 0 would stack them as (3, b, h, s, hd) and copy them again to undo the permutation.
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (b, h, s, hd)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, s, hd)
            elif mask.backend == "flex":
                out = compiled_flex_attention()(q, k, v, block_mask=mask.block_mask)  # (b, h, s, hd)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)  # (b, h, s, hd)
            out = out.transpose(1, 2)  # (b, s, h, hd)
        return self.out_proj(out.reshape(b, s, d))  # (b, s, d)

    def _flash(self, qkv: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
        # The packed-QKV entry points: the backward writes one (b, s, 3, h, hd) gradient, no stack of three.
        flash_attn_qkvpacked_func, flash_attn_varlen_qkvpacked_func = _flash_attn()
        b, s = qkv.shape[:2]
        if mask.cu_seqlens is None:
            return flash_attn_qkvpacked_func(qkv, causal=True)  # (b, s, h, hd)
        out = flash_attn_varlen_qkvpacked_func(qkv.view(b * s, 3, self.num_heads, self.head_dim), mask.cu_seqlens,
                                               mask.max_seqlen, causal=True)  # (b*s, h, hd)
        return out.view(b, s, self.num_heads, self.head_dim)  # (b, s, h, hd)
