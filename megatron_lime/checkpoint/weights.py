"""Weights with megatron_lime names from any layout training or export leaves (see format.py):

  DeepSpeed    the fp32 master weights gathered from the ZeRO optimizer partitions (any data-parallel
               size, stage 1 or 2); without them the module weights, in the dtype they were saved in.
               A universal checkpoint (ds_to_universal's <tag>_universal/) is read from zero/<param>/fp32.pt.
  consolidated model.safetensors (megatron_lime names) + lime_config.json.
  Hugging Face config.json (model_type "lime") + model.safetensors, as written by the export.

Every file is checked against the checkpoint's content hashes before it is read (integrity.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_lime.checkpoint import integrity
from megatron_lime.checkpoint.consolidated import read_consolidated, read_export
from megatron_lime.checkpoint.hf_names import hf_config_to_lime, hf_to_lime_state_dict
from megatron_lime.checkpoint.format import (MODEL_STATES, TAG_PATTERN, UNIVERSAL_PARAM_FILE, UNIVERSAL_PARAMS,
                                             UNIVERSAL_SUFFIX, CheckpointError, Layout, detect_layout,
                                             optimizer_shards, resolve_load)
from megatron_lime.checkpoint.safe_load import deepspeed_loads_safely, torch_load
from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeModel

logger = logging.getLogger(__name__)

# Prefixes that wrappers add to parameter names (torch.compile, DDP-style wrappers).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class LimeWeights:
    """Weights with megatron_lime names, the config they fit, and what is known of the run that made them."""

    state_dict: dict[str, torch.Tensor]
    config: LimeConfig
    metadata: dict[str, Any] = field(default_factory=dict)  # lime_config.json's content, without "files"
    kind: Layout = "consolidated"
    source: str = ""  # one line for logs and the model card: where the weights came from


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for name, tensor in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        cleaned[name] = tensor
    return cleaned


def _run_record(metadata: dict[str, Any]) -> dict[str, Any]:
    """The run's record without the content hashes (they describe the files, not the weights)."""
    return {k: v for k, v in metadata.items() if k != integrity.RECORD_KEY}


def read_deepspeed(save_dir: str | os.PathLike, tag: str | None = None) -> LimeWeights:
    source = resolve_load(str(save_dir), universal=False, tag=tag)
    tag_dir, tag = source.tag_dir, source.tag
    metadata = source.meta
    config = LimeConfig.from_dict(metadata["model"])
    optimizer_files = optimizer_shards(tag_dir)
    universal_dir = os.path.join(tag_dir, UNIVERSAL_PARAMS)
    state_dict = None
    if not os.path.isdir(universal_dir):
        integrity.verify(tag_dir, metadata)  # every file of the tag: the weights, and the rest costs little
    if os.path.isdir(universal_dir):
        # ds_to_universal's zero/<param>/fp32.pt each hold one whole fp32 master parameter. Its files are
        # not the save's: the source tag's record does not cover them.
        integrity.warn_unverified(tag_dir)
        state_dict = {name: torch_load(os.path.join(universal_dir, name, UNIVERSAL_PARAM_FILE))["param"]
                      for name in sorted(os.listdir(universal_dir))
                      if os.path.isfile(os.path.join(universal_dir, name, UNIVERSAL_PARAM_FILE))}
        source_line = f"DeepSpeed universal checkpoint {tag_dir}: fp32 master weights"
    elif optimizer_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with deepspeed_loads_safely():
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(source.path), tag=tag)
            source_line = f"DeepSpeed checkpoint {tag_dir}: fp32 master weights from {len(optimizer_files)} rank(s)"
        except CheckpointError:
            raise
        except (ValueError, KeyError) as err:
            # e.g. a checkpoint saved without ZeRO, whose optimizer files hold no flat fp32 partitions
            logger.warning("%s: cannot gather fp32 master weights (%s); using the module weights instead",
                           tag_dir, err)
    if state_dict is None:
        state_dict = torch_load(os.path.join(tag_dir, MODEL_STATES))["module"]
        dtype = next(iter(state_dict.values())).dtype
        source_line = f"DeepSpeed checkpoint {tag_dir}: module weights ({dtype}; no fp32 master weights found)"
    state_dict = _strip_wrapper_prefixes(state_dict)
    state_dict = LimeModel.checked_weights(state_dict, config, str(tag_dir))
    step = TAG_PATTERN.match(tag.removesuffix(UNIVERSAL_SUFFIX))
    metadata = _run_record(metadata)
    if "iteration" not in metadata and step:
        metadata["iteration"] = int(step.group(1))
    return LimeWeights(state_dict, config, metadata, "deepspeed", source_line)


def _read_consolidated_weights(directory: str) -> LimeWeights:
    state_dict, metadata = read_consolidated(directory)
    config = LimeConfig.from_dict(metadata["model"])
    state_dict = LimeModel.checked_weights(state_dict, config, os.path.join(directory, "model.safetensors"))
    return LimeWeights(state_dict, config, _run_record(metadata), "consolidated",
                       f"consolidated checkpoint {directory}")


def _read_export_weights(directory: str) -> LimeWeights:
    """Weights of a Hugging Face LIME folder (ours or one saved by save_pretrained), with megatron_lime names."""
    hf_config, hf_state, run = read_export(directory)
    config = hf_config_to_lime(hf_config, name=hf_config.get("lime_preset", "custom"))
    state_dict = hf_to_lime_state_dict(hf_state, config.num_layers)
    state_dict = LimeModel.checked_weights(state_dict, config, str(directory))
    metadata = dict(_run_record(run), model=config.to_dict())
    return LimeWeights(state_dict, config, metadata, "hf", f"Hugging Face folder {directory}")


def load_lime_weights(path: str | os.PathLike, tag: str | None = None) -> LimeWeights:
    """Weights from a DeepSpeed save dir, a consolidated dir or a Hugging Face export (detected), verified."""
    path = str(path)
    kind = detect_layout(path)
    if tag is not None and kind != "deepspeed":
        raise CheckpointError(f"{path}: --tag only applies to DeepSpeed checkpoints, this is a {kind} checkpoint")
    if kind == "deepspeed":
        return read_deepspeed(path, tag)
    if kind == "consolidated":
        return _read_consolidated_weights(path)
    return _read_export_weights(path)
