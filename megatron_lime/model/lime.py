"""LIME: a decoder-only Transformer with sinusoidal positions, RMSNorm, a non-gated SiLU MLP
and an output head tied to the token embedding. Plain PyTorch: nothing distributed here.

    x = embed(tokens) * sqrt(d) + PE[positions]
    for each block:  x = x + attn(rms_norm(x));  x = x + fc_out(silu(fc_in(rms_norm(x))))
    logits = rms_norm(x) @ embed.weight^T

Every residual add is one fused op with the norm that follows it (kernels.add_rms_norm): the attention's with
the MLP's norm, and the MLP's with the next block's attention norm (or the final norm), so a block returns its
MLP output unadded and the next block adds it. The residual stream is read once per add, and the add's
backward is the norm's.

No linear layer has a bias (as in PaLM and LLaMA: biases add nothing measurable at this
scale and complicate the fused kernels and the conversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_lime import kernels
from megatron_lime.config import LimeConfig
from megatron_lime.errors import LimeInputError
from megatron_lime.model.attention import CausalSelfAttention, DocumentMask, document_mask
from megatron_lime.model.linear import Linear, weights_changed
from megatron_lime.model.loss import chunked_language_model_loss, language_model_loss
from megatron_lime.model.positions import sinusoid_table

POSITION_TABLE = "position_table"  # the sinusoid buffer's name: computed from the config, never a weight


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, self(residual + delta)) in one pass over the residual stream."""
        return kernels.add_rms_norm(residual, delta, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, config: LimeConfig):
        super().__init__()
        self.fc_in = Linear(config.hidden_size, config.ffn_hidden_size)
        self.fc_out = Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(kernels.silu(self.fc_in(x)))  # (b, s, d) -> (b, s, f) -> (b, s, d)


class LimeBlock(nn.Module):
    def __init__(self, config: LimeConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: DocumentMask | None = None,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block, its MLP's residual add left to the next norm: returns (x, delta) with x + delta the output.

        x: (b, s, d) the residual stream; mask: the batch's document mask from attention.document_mask (None:
        causal); delta: (b, s, d) the previous block's MLP output not yet added to x (None for the first block).
        Each residual add runs fused with the norm that reads its sum (kernels.add_rms_norm): the stream is read
        once per add, and the add's backward is the norm's.
        """
        if delta is None:
            normed = self.attn_norm(x)  # (b, s, d)
        else:
            x, normed = self.attn_norm.add_and_norm(x, delta)  # (b, s, d) each
        x, normed = self.mlp_norm.add_and_norm(x, self.attention(normed, mask))  # (b, s, d) each
        return x, self.mlp(normed)


@dataclass
class LimeOutput:
    logits: torch.Tensor | None  # (b, s, vocab); None when the loss was computed in chunks (never all logits)
    loss: torch.Tensor | None = None  # scalar: mean (or sum) of cross-entropy over trained tokens
    num_loss_tokens: torch.Tensor | None = None  # scalar: how many tokens the loss covers


class LimeModel(nn.Module):
    def __init__(self, config: LimeConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LimeBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        # Not persistent: it is a function of the config, so checkpoints never carry it.
        self.register_buffer(POSITION_TABLE, torch.empty(config.max_position_embeddings, config.hidden_size),
                             persistent=False)
        self.embedding_scale = math.sqrt(config.hidden_size)
        self.activation_checkpointing = False  # switched on by training.wrap, never by the model
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection: the token embedding itself (one tensor, tied)."""
        return self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2/Megatron initialisation; also (re)computes the position table.

        Call after `to_empty()` when the model was built on the meta device.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_output = name.endswith("attention.out_proj") or name.endswith("mlp.fc_out")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_output else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.reset_position_table()

    @torch.no_grad()
    def reset_position_table(self) -> None:
        table = sinusoid_table(self.config.max_position_embeddings, self.config.hidden_size,
                               self.config.position_base, device=self.position_table.device)
        self.position_table.copy_(table)

    @classmethod
    def checked_weights(cls, state_dict: dict[str, torch.Tensor], config: LimeConfig,
                        where: str) -> dict[str, torch.Tensor]:
        """`state_dict`'s weights, after checking they are exactly those of a LimeModel for `config`: every name,
        each with its shape. A position table beside them (DeepSpeed's gathered fp32 weights list every buffer)
        is dropped: it is a function of the config, never a weight."""
        with torch.device("meta"):
            reference = cls(config).state_dict()
        weights = {name: tensor for name, tensor in state_dict.items() if name != POSITION_TABLE}
        missing, unexpected = sorted(reference.keys() - weights.keys()), sorted(weights.keys() - reference.keys())
        if missing or unexpected:
            raise LimeInputError(f"{where}: weights do not fit {config.num_layers}-layer LIME ({config.name}); "
                           f"missing {missing[:6]}, unexpected {unexpected[:6]}")
        for name, tensor in reference.items():
            if weights[name].shape != tensor.shape:
                raise LimeInputError(f"{where}: {name} has shape {tuple(weights[name].shape)}, "
                                 f"the config gives {tuple(tensor.shape)}")
        return weights

    def load_weights(self, state_dict: dict[str, torch.Tensor], where: str) -> None:
        """Copy `state_dict`'s weights into this model, checked first (checked_weights); the position table
        stays the one computed from the config. Any kept low-precision copy of a weight is stale from now on."""
        self.load_state_dict(self.checked_weights(state_dict, self.config, where))
        weights_changed()

    @classmethod
    def from_weights(cls, state_dict: dict[str, torch.Tensor], config: LimeConfig, where: str,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LimeModel:
        """A model in eval mode holding `state_dict`'s weights (checked; the tensors are taken, not copied, where
        device and dtype allow) on `device`, in `dtype` (None keeps the stored one). The position table is
        computed from the config, and kept in fp32 whatever `dtype` is."""
        weights = cls.checked_weights(state_dict, config, where)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(weights, assign=True)
        model.position_table = torch.empty(config.max_position_embeddings, config.hidden_size)
        model.reset_position_table()
        model = model.to(device=device, dtype=dtype).eval()
        model.position_table = model.position_table.float()
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> LimeOutput:
        """Logits for every position, or the loss when labels are given.

        With labels and config.loss_chunk_size > 0 (the default) the loss is computed chunk by chunk from
        the hidden states and `logits` is None; loss_chunk_size=0 returns the logits and the loss.

        input_ids:    (b, s) int token ids, s <= max_position_embeddings.
        labels:       (b, s) int next-token targets (already shifted: labels[:, t] follows input_ids[:, t]);
                      -100 marks a position without a target.
        loss_mask:    (b, s) 0/1 (or float weights): which positions the loss covers.
        position_ids: (b, s) or (s,) positions; default 0..s-1. Packed sequences restart them per document.
        document_ids: (b, s) ids; tokens attend only within their own document (packing without cross-talk).
        loss_reduction: "mean" over covered tokens, or "sum" (the caller divides by a global count).
        """
        b, s = input_ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            positions = self.position_table[:s]  # (s, d)
        else:
            positions = F.embedding(position_ids, self.position_table)  # (b, s, d) or (s, d)
        embeddings = self.tok_embeddings(input_ids)  # (b, s, d)
        # The table stays fp32; the sum takes the embedding's dtype (bf16 under DeepSpeed's bf16 mode). Under
        # autocast the residual stream is kept in autocast's dtype, as Megatron-LM keeps it in bf16 by default
        # (--fp32-residual-connection off): the blocks' adds and norms read and write half the bytes and run fused
        # (their statistics stay fp32); with fp32 weights the embedding would otherwise make it fp32 throughout.
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(
            input_ids.device.type) else embeddings.dtype
        x = (embeddings * self.embedding_scale + positions.to(embeddings.dtype)).to(dtype)  # (b, s, d)
        # Once per batch, not per layer: the block mask (flex), the dense mask (sdpa) or cu_seqlens (flash).
        mask = document_mask(self.config.attention_backend, x, document_ids)
        delta = None  # each block's MLP output, added to the stream by the next norm (LimeBlock.forward)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x, delta = checkpoint(layer, x, mask, delta, use_reentrant=False)
            else:
                x, delta = layer(x, mask, delta)
        x = self.final_norm(x) if delta is None else self.final_norm.add_and_norm(x, delta)[1]
        if labels is not None and self.config.loss_chunk_size:
            # The loss straight from the hidden states, chunk by chunk: no (b, s, vocab) fp32 tensor.
            loss, count = chunked_language_model_loss(x, self.lm_head_weight, labels, loss_mask, loss_reduction,
                                                      self.config.loss_chunk_size)
            return LimeOutput(logits=None, loss=loss, num_loss_tokens=count)
        logits = F.linear(x, self.lm_head_weight)  # (b, s, vocab)
        if labels is None:
            return LimeOutput(logits=logits)
        loss, count = language_model_loss(logits, labels, loss_mask, loss_reduction)
        return LimeOutput(logits=logits, loss=loss, num_loss_tokens=count)

