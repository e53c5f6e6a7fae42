"""The one declarative map between megatron_lime names and the Hugging Face export's, read both ways.

Weights: `HF_TO_LIME_WEIGHTS` maps every Hugging Face parameter name to megatron_lime's; `{}`
stands for the layer index. Every tensor is copied unchanged (same shape, same layout: the fused
QKV keeps its rows [q; k; v]); nothing is split, padded or transposed, so HF -> ours -> HF
gives identical tensors. `lm_head.weight` is not in the map: it is tied to
`model.embed_tokens.weight` and stored once.

Config: `HF_TO_LIME_CONFIG` maps config.json fields to LimeConfig fields.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_lime.checkpoint.format import CheckpointError
from megatron_lime.config import LimeConfig

HF_TO_LIME_WEIGHTS: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.qkv_proj.weight": "layers.{}.attention.qkv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.out_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.fc_in.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.fc_out.weight",
    "model.norm.weight": "final_norm.weight",
}
LIME_TO_HF_WEIGHTS: dict[str, str] = {lime: hf for hf, lime in HF_TO_LIME_WEIGHTS.items()}

# The tied output head: present in a Hugging Face state dict held in memory, never in the file.
HF_TIED_HEAD = "lm_head.weight"
HF_TIED_SOURCE = "model.embed_tokens.weight"

HF_TO_LIME_CONFIG: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "ffn_hidden_size",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "norm_eps",
    "initializer_range": "init_std",
    "position_base": "position_base",
}

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _rename(name: str, table: dict[str, str], direction: str) -> str:
    """`name` through `table`, with the layer index (if any) taken out and put back."""
    match = _LAYER_INDEX.search(name)
    pattern = name[:match.start()] + ".{}." + name[match.end():] if match else name
    if pattern not in table:
        raise CheckpointError(f"{direction}: no mapping for weight {name!r} (pattern {pattern!r}); "
                       f"known patterns: {', '.join(table)}")
    return table[pattern].format(match.group(1)) if match else table[pattern]


def _check_complete(converted: dict[str, torch.Tensor], table: dict[str, str], num_layers: int,
                    direction: str) -> None:
    expected = {v.format(i) for v in table.values() for i in range(num_layers)}
    missing = sorted(expected - converted.keys())
    extra = sorted(converted.keys() - expected)
    if missing or extra:
        raise CheckpointError(f"{direction}: weights do not match a {num_layers}-layer LIME model; "
                       f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}")


def lime_to_hf_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """megatron_lime keys -> Hugging Face keys (without the tied lm_head.weight). Tensors are not copied."""
    converted = {_rename(name, LIME_TO_HF_WEIGHTS, "megatron_lime -> HF"): t for name, t in state_dict.items()}
    _check_complete(converted, LIME_TO_HF_WEIGHTS, num_layers, "megatron_lime -> HF")
    return converted


def hf_to_lime_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face keys -> megatron_lime keys. A tied lm_head.weight, if present, must equal the embedding."""
    state_dict = dict(state_dict)
    head = state_dict.pop(HF_TIED_HEAD, None)
    if head is not None and HF_TIED_SOURCE in state_dict and not torch.equal(head, state_dict[HF_TIED_SOURCE]):
        raise CheckpointError(f"{HF_TIED_HEAD} differs from {HF_TIED_SOURCE}; LIME ties them, so this is not a "
                              "LIME model")
    converted = {_rename(name, HF_TO_LIME_WEIGHTS, "HF -> megatron_lime"): t for name, t in state_dict.items()}
    _check_complete(converted, HF_TO_LIME_WEIGHTS, num_layers, "HF -> megatron_lime")
    return converted


def lime_config_to_hf(config: LimeConfig) -> dict[str, Any]:
    """The architecture fields of config.json for `config`."""
    return {hf: getattr(config, lime) for hf, lime in HF_TO_LIME_CONFIG.items()}


def hf_config_to_lime(hf_config: dict[str, Any], name: str = "custom") -> LimeConfig:
    """LimeConfig from a config.json dict (fields outside the map are ignored)."""
    if hf_config.get("model_type") not in (None, "lime"):
        raise CheckpointError(f"config.json has model_type={hf_config.get('model_type')!r}, expected 'lime'")
    missing = [hf for hf in HF_TO_LIME_CONFIG if hf not in hf_config]
    if missing:
        raise CheckpointError(f"config.json lacks {missing}")
    return LimeConfig(name=name, **{lime: hf_config[hf] for hf, lime in HF_TO_LIME_CONFIG.items()})
