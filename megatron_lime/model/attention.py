"""Causal self-attention with a fused QKV projection.

Backends: flash-attn (CUDA, bf16/fp16, when installed) or PyTorch's
scaled_dot_product_attention everywhere else. Packed sequences pass `document_ids`
(b, s): a token attends only to earlier tokens of its own document.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lime.config import LimeConfig

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _flash_attn():
    """The flash_attn module, or None when it is not installed."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (b, 1, s, s): True where query i may attend to key j (j <= i, same document)."""
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()  # (s, s)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (b, s, s)
    return (same_document & causal)[:, None]  # (b, 1, s, s)


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts (n_docs + 1,) int32 for flash-attn's varlen path, and the longest run.

    Every maximal run of equal ids within a row is one sequence; rows never join.
    """
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (b, s)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_positions = starts.flatten().nonzero().flatten()  # (n_docs,)
    total = torch.tensor([b * s], device=document_ids.device)
    cu_seqlens = torch.cat((start_positions, total)).to(torch.int32)  # (n_docs + 1,)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LimeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.backend = config.attention_backend
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def _use_flash(self, x: torch.Tensor) -> bool:
        if self.backend == "sdpa":
            return False
        usable = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _flash_attn() is not None
        if self.backend == "flash" and not usable:
            raise RuntimeError(
                "attention_backend='flash' needs flash-attn installed (pip install 'megatron-lime[gpu]') "
                f"and CUDA bf16/fp16 inputs; got device={x.device}, dtype={x.dtype}, "
                f"flash_attn installed={_flash_attn() is not None}"
            )
        return usable

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim)  # (b, s, 3, h, hd)
        if self._use_flash(x):
            out = self._flash(qkv, document_ids)  # (b, s, h, hd)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (b, h, s, hd)
            if document_ids is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, s, hd)
            else:
                mask = document_attention_mask(document_ids)  # (b, 1, s, s)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, h, s, hd)
            out = out.transpose(1, 2)  # (b, s, h, hd)
        return self.out_proj(out.reshape(b, s, d))  # (b, s, d)

    def _flash(self, qkv: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
        flash_attn_func, flash_attn_varlen_func = _flash_attn()
        b, s = qkv.shape[:2]
        q, k, v = qkv.unbind(2)  # 3 x (b, s, h, hd)
        if document_ids is None:
            return flash_attn_func(q, k, v, causal=True)  # (b, s, h, hd)
        cu_seqlens, max_seqlen = cu_seqlens_from_document_ids(document_ids)
        flat = lambda t: t.reshape(b * s, self.num_heads, self.head_dim)  # (b*s, h, hd)
        out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens,
                                     max_seqlen, max_seqlen, causal=True)  # (b*s, h, hd)
        return out.view(b, s, self.num_heads, self.head_dim)  # (b, s, h, hd)
