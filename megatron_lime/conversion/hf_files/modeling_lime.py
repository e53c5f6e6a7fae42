"""Hugging Face modeling code of LIME models (shipped inside every export, loaded with trust_remote_code=True).

Standalone: imports only torch and transformers, never megatron_lime, so an exported folder
works anywhere transformers does. The computation is exactly megatron_lime's LimeModel:

    x = embed(tokens) * sqrt(d) + PE[positions]          PE: sinusoids, sin/cos interleaved, base 10000
    for each block:  x = x + o_proj(attn(rms_norm(x)));  x = x + down_proj(silu(up_proj(rms_norm(x))))
    logits = rms_norm(x) @ embed.weight^T                 (lm_head tied to embed_tokens)

The sinusoid table is computed from the positions on every call rather than kept in a
buffer: a non-persistent buffer is not in model.safetensors, and `from_pretrained` (which
builds the model on the meta device) would hand it back as uninitialised memory.

Supported transformers versions: 4.56 to 5.24. Differences handled here:
  - the KV cache arrives as `cache=` (transformers >= 5.24) or `past_key_values=` (older), and
    the output field that returns it is named accordingly;
  - `_tied_weights_keys` is a dict {tied: source} in 5.x and a list in 4.x.
Only `Cache` objects are accepted (DynamicCache is created when none is given); legacy tuples are not.

Integrity: `from_pretrained` on a local folder first checks every file of the export against the hash
its record lists (integrity_lime.py), and stops with one line naming the file, the expected and the
found hash.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lime import LimeConfig
from .integrity_lime import verify_local_export

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5.24 renamed the output field `past_key_values` to `cache`; generate reads whichever exists.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def sinusoid_embedding(position_ids: torch.Tensor, hidden_size: int, base: float) -> torch.Tensor:
    """PE[position_ids] as float32, shape position_ids.shape + (hidden_size,).

    PE[p, 2i] = sin(p * w_i), PE[p, 2i + 1] = cos(p * w_i), w_i = base^(-2i / d). Angles are
    computed in float64 (as megatron_lime computes its table) so every position is exact to
    float32 rounding; MPS has no float64 and falls back to float32.
    """
    compute_dtype = torch.float32 if position_ids.device.type == "mps" else torch.float64
    pair_index = torch.arange(0, hidden_size, 2, dtype=compute_dtype, device=position_ids.device)  # (d/2,)
    frequencies = torch.pow(base, -pair_index / hidden_size)  # (d/2,)
    angles = position_ids.to(compute_dtype)[..., None] * frequencies  # (..., d/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (..., d/2, 2)
    return table.flatten(-2).to(torch.float32)  # (..., d), sin/cos interleaved


class LimeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 whatever the input dtype, as in training.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class LimeMLP(nn.Module):
    def __init__(self, config: LimeConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.up_proj(x)))  # (b, s, d) -> (b, s, f) -> (b, s, d)


class LimeAttention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection (rows [q; k; v], heads contiguous)."""

    def __init__(self, config: LimeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        """attention_mask: None for plain causal attention over the current tokens only, else a boolean
        (b or 1, 1, q, kv) mask, True where the query may attend to the key."""
        b, q_len, d = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, q_len, 3, self.num_heads, self.head_dim)  # (b, q, 3, h, hd)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (b, h, q, hd)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # 2 x (b, h, kv, hd), past + current
        if attention_mask is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)  # (b, h, q, hd)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # (b, h, q, hd)
        out = out.transpose(1, 2).reshape(b, q_len, d)  # (b, q, d)
        return self.o_proj(out)


class LimeDecoderLayer(nn.Module):
    def __init__(self, config: LimeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LimeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LimeAttention(config, layer_idx)
        self.post_attention_layernorm = LimeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LimeMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LimePreTrainedModel(PreTrainedModel):
    config_class = LimeConfig
    config: LimeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LimeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Attention always runs through torch's scaled_dot_product_attention.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flash_attn_2 = False
    _supports_flex_attn = False
    _supports_cache_class = True  # transformers 4.x: this model takes Cache objects
    _supports_static_cache = False
    _can_compile_fullgraph = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, after the files of a local export folder are checked (integrity_lime.py)."""
        verify_local_export(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _positions_and_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    query_length: int,
    past_length: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids (b or 1, q) and the attention mask the layers use (see LimeAttention.forward).

    attention_mask is the usual 2-D (b, past + q) 1/0 padding mask, or a ready 4-D mask
    (boolean, or additive float with 0 where attention is allowed). Left-padded rows get their
    positions from the mask's cumulative sum, so their first real token sits at position 0.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask.to(device)
        if position_ids is None:
            running = attention_mask.long().cumsum(-1) - 1  # (b, past + q)
            position_ids = running.clamp(min=0)[:, -query_length:]  # (b, q)
        key_length = attention_mask.shape[-1]
        if key_length != past_length + query_length:
            raise ValueError(f"attention_mask covers {key_length} tokens but the cache holds {past_length} and "
                             f"{query_length} are new")
        query_index = torch.arange(past_length, past_length + query_length, device=device)  # (q,)
        key_index = torch.arange(key_length, device=device)  # (kv,)
        causal = key_index[None, :] <= query_index[:, None]  # (q, kv)
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (b, 1, q, kv)
    elif attention_mask is not None:  # 4-D, already causal
        mask = attention_mask.to(device)
        mask = mask if mask.dtype == torch.bool else mask == 0  # (b, 1, q, kv)
    elif past_length == 0:
        mask = None  # plain causal over the current tokens: SDPA's is_causal path, as in training
    else:
        # A cache and no padding: the new tokens see the whole cache and causally each other.
        query_index = torch.arange(past_length, past_length + query_length, device=device)  # (q,)
        key_index = torch.arange(past_length + query_length, device=device)  # (kv,)
        mask = (key_index[None, :] <= query_index[:, None])[None, None]  # (1, 1, q, kv)
    if mask is not None:
        # A left-padding query may attend to nothing; let it attend to everything instead, since an
        # all-masked row gives NaN, and NaN in a padding position's keys would reach real tokens
        # through 0 * NaN. Real tokens never attend to padding, so their outputs are unaffected.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + query_length, device=device)[None]  # (1, q)
    return position_ids.to(device), mask


class LimeModel(LimePreTrainedModel):
    """The LIME Transformer without its head: returns the final-norm hidden states."""

    def __init__(self, config: LimeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LimeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LimeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_scale = math.sqrt(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids (b, q) or inputs_embeds (b, q, d) (unscaled, as from embed_tokens); attention_mask
        (b, past + q)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"the KV cache must be a transformers Cache (e.g. DynamicCache), "
                            f"got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (b, q, d)
        q_len = inputs_embeds.shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        position_ids, mask = _positions_and_mask(attention_mask, position_ids, q_len, past_length,
                                                 inputs_embeds.device)
        longest = int(position_ids.max())
        if longest >= self.config.max_position_embeddings:
            raise ValueError(f"position {longest} is beyond max_position_embeddings="
                             f"{self.config.max_position_embeddings}, the longest context this model was trained on; "
                             "shorten the prompt or max_new_tokens")
        positions = sinusoid_embedding(position_ids, self.config.hidden_size, self.config.position_base)  # (b, q, d)
        hidden_states = inputs_embeds * self.embedding_scale + positions.to(inputs_embeds.dtype)  # (b, q, d)
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, mask, cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            **{_CACHE_FIELD: cache},
        )


class LimeForCausalLM(LimePreTrainedModel, GenerationMixin):
    """LIME with its language-model head (tied to the token embedding)."""

    # {tied parameter: the parameter it shares} in transformers 5.x; a list of tied names in 4.x.
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5
                          else ["lm_head.weight"])

    def __init__(self, config: LimeConfig):
        super().__init__(config)
        self.model = LimeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head.weight to model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (b, q, vocab), or of the last `logits_to_keep` positions when it is > 0.

        labels (b, q) follow the transformers convention: unshifted (labels[:, t] is the token at t;
        the loss predicts it from position t - 1), -100 = ignored. `num_items_in_batch` (from the
        Trainer) makes the loss a sum divided by it.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state  # (b, q, d)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]  # (b, k, d)
        logits = self.lm_head(hidden_states)  # (b, q or k, vocab)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().flatten(0, 1)  # (b*(q-1), vocab)
            shift_labels = labels[:, 1:].to(logits.device).flatten()  # (b*(q-1),)
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum") / num_items
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: outputs[_CACHE_FIELD] if _CACHE_FIELD in outputs else None},
        )
