"""Read LIME weights from any place training leaves them, for conversion and generation.

Three layouts are recognised (see `load_lime_weights`):

  DeepSpeed    SAVE_DIR/latest (the tag) and SAVE_DIR/<tag>/ with mp_rank_00_model_states.pt,
               *_optim_states.pt (one per data-parallel rank) and lime_config.json. The fp32
               master weights are gathered from the optimizer partitions (any data-parallel
               size, ZeRO stage 1 or 2); without them the module weights are used, in the dtype
               they were saved in. A universal checkpoint (ds_to_universal's <tag>_universal/,
               named with --tag or given as the directory) is read from its zero/<param>/fp32.pt.
  consolidated DIR/model.safetensors (megatron_lime names) + DIR/lime_config.json.
  Hugging Face DIR/config.json (model_type "lime") + model.safetensors, as written by the export.

The checkpoint layouts, which tag `latest` names and how .pt files are loaded safely (no pickled
code runs) are megatron_lime/checkpoint.py's; this module turns what it finds into LimeWeights.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_lime import checkpoint
from megatron_lime.checkpoint import CONSOLIDATED_WEIGHTS as WEIGHTS_FILE
from megatron_lime.checkpoint import LIME_CONFIG as LIME_CONFIG_FILE
from megatron_lime.checkpoint import CheckpointError, load_safetensors, read_lime_config as read_metadata
from megatron_lime.config import LimeConfig
from megatron_lime.conversion.weight_map import hf_config_to_lime, hf_to_lime_state_dict
from megatron_lime.files import atomic_directory, read_json

logger = logging.getLogger(__name__)

# The run's record inside a Hugging Face export. Not named lime_config.json: the trainer takes a
# folder with model.safetensors + lime_config.json for a consolidated checkpoint, and an export's
# weights have Hugging Face names (convert it back with --from-hf).
EXPORT_RUN_FILE = "lime_run.json"
CheckpointKind = Literal["deepspeed", "consolidated", "hf"]

# Prefixes that wrappers add to parameter names (torch.compile, DDP-style wrappers).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class LimeWeights:
    """Weights with megatron_lime names, the config they fit, and what is known of the run that made them."""

    state_dict: dict[str, torch.Tensor]
    config: LimeConfig
    metadata: dict[str, Any] = field(default_factory=dict)  # lime_config.json's content
    kind: CheckpointKind = "consolidated"
    source: str = ""  # one line for logs and the model card: where the weights came from


def read_lime_config(path: Path) -> tuple[LimeConfig, dict[str, Any]]:
    """LimeConfig and the full metadata from a lime_config.json."""
    metadata = read_metadata(path)
    return LimeConfig.from_dict(metadata["model"]), metadata


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for name, tensor in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        cleaned[name] = tensor
    return cleaned


def validate_state_dict(state_dict: dict[str, torch.Tensor], config: LimeConfig, where: str) -> None:
    """Raise unless `state_dict` has exactly LimeModel's keys and shapes for `config`."""
    from megatron_lime.model import LimeModel

    with torch.device("meta"):
        reference = LimeModel(config).state_dict()
    missing = sorted(reference.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - reference.keys())
    if missing or unexpected:
        raise KeyError(f"{where}: weights do not fit {config.num_layers}-layer LIME ({config.name}); "
                       f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    for name, tensor in reference.items():
        if state_dict[name].shape != tensor.shape:
            raise ValueError(f"{where}: {name} has shape {tuple(state_dict[name].shape)}, "
                             f"the config gives {tuple(tensor.shape)}")


def detect_checkpoint_kind(path: Path) -> CheckpointKind:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    # An export also holds model.safetensors, so config.json decides.
    if (path / "config.json").is_file():
        return "hf"
    if checkpoint.is_consolidated(str(path)) and (path / LIME_CONFIG_FILE).is_file():
        return "consolidated"
    if checkpoint.holds_checkpoint(str(path)):
        return "deepspeed"
    raise CheckpointError(
        f"{path}: not a LIME checkpoint. Expected a DeepSpeed save dir (latest + complete global_stepN/), "
        f"a consolidated dir ({WEIGHTS_FILE} + {LIME_CONFIG_FILE}) or a Hugging Face export (config.json)")


def read_deepspeed(save_dir: Path, tag: str | None = None) -> LimeWeights:
    source = checkpoint.resolve_load(str(save_dir), universal=False, tag=tag)
    save_dir, tag_dir, tag = Path(source.path), Path(source.tag_dir), source.tag
    metadata = source.meta
    config = LimeConfig.from_dict(metadata["model"])
    optimizer_files = checkpoint.optimizer_shards(str(tag_dir))
    state_dict = None
    if (tag_dir / "zero").is_dir():
        # A universal checkpoint (deepspeed.checkpoint.ds_to_universal): zero/<param>/fp32.pt each
        # hold one whole fp32 master parameter.
        state_dict = {p.name: checkpoint.torch_load(p / "fp32.pt")["param"]
                      for p in sorted((tag_dir / "zero").iterdir()) if (p / "fp32.pt").is_file()}
        source_line = f"DeepSpeed universal checkpoint {tag_dir}: fp32 master weights"
    elif optimizer_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            with checkpoint.deepspeed_loads_safely():
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
            source_line = f"DeepSpeed checkpoint {tag_dir}: fp32 master weights from {len(optimizer_files)} rank(s)"
        except CheckpointError:
            raise
        except (ValueError, KeyError) as err:
            # e.g. a checkpoint saved without ZeRO, whose optimizer files hold no flat fp32 partitions
            logger.warning("%s: cannot gather fp32 master weights (%s); using the module weights instead",
                           tag_dir, err)
    if state_dict is None:
        saved = checkpoint.torch_load(tag_dir / checkpoint.MODEL_STATES)
        state_dict = saved["module"]
        dtype = next(iter(state_dict.values())).dtype
        source_line = f"DeepSpeed checkpoint {tag_dir}: module weights ({dtype}; no fp32 master weights found)"
    state_dict = _strip_wrapper_prefixes(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if k != "position_table"}
    validate_state_dict(state_dict, config, str(tag_dir))
    step = re.fullmatch(r"global_step(\d+)(_universal)?", tag)
    if "iteration" not in metadata and step:
        metadata["iteration"] = int(step.group(1))
    return LimeWeights(state_dict, config, metadata, "deepspeed", source_line)


def read_consolidated(directory: Path) -> LimeWeights:
    state_dict, metadata = checkpoint.load_consolidated(str(directory))
    config = LimeConfig.from_dict(metadata["model"])
    validate_state_dict(state_dict, config, str(directory / WEIGHTS_FILE))
    return LimeWeights(state_dict, config, metadata, "consolidated", f"consolidated checkpoint {directory}")


def write_consolidated(directory: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write DIR/model.safetensors + DIR/lime_config.json (checkpoint.save_consolidated), atomically."""
    if "model" not in metadata:
        raise ValueError("consolidated metadata needs a \"model\" entry (LimeConfig.to_dict())")
    config = LimeConfig.from_dict(metadata["model"])
    validate_state_dict(state_dict, config, f"weights for {directory}")
    with atomic_directory(Path(directory)) as tmp:
        checkpoint.save_consolidated(str(tmp), state_dict, metadata)


def read_hf_export(directory: Path) -> LimeWeights:
    """Weights of a Hugging Face LIME folder (ours or one saved by save_pretrained), with megatron_lime names."""
    try:
        hf_config = read_json(directory / "config.json")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    config = hf_config_to_lime(hf_config, name=hf_config.get("lime_preset", "custom"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        hf_state = {k: v for shard in shards for k, v in load_safetensors(directory / shard).items()}
    else:
        hf_state = load_safetensors(directory / WEIGHTS_FILE)
    state_dict = hf_to_lime_state_dict(hf_state, config.num_layers)
    validate_state_dict(state_dict, config, str(directory))
    metadata: dict[str, Any] = {}
    if (directory / EXPORT_RUN_FILE).is_file():
        _, metadata = read_lime_config(directory / EXPORT_RUN_FILE)
    metadata["model"] = config.to_dict()
    return LimeWeights(state_dict, config, metadata, "hf", f"Hugging Face folder {directory}")


def load_lime_weights(path: str | os.PathLike, tag: str | None = None) -> LimeWeights:
    """Weights from a DeepSpeed save dir, a consolidated dir or a Hugging Face export (detected)."""
    path = Path(path)
    kind = detect_checkpoint_kind(path)
    if tag is not None and kind != "deepspeed":
        raise ValueError(f"{path}: --tag only applies to DeepSpeed checkpoints, this is a {kind} checkpoint")
    if kind == "deepspeed":
        return read_deepspeed(path, tag)
    if kind == "consolidated":
        return read_consolidated(path)
    return read_hf_export(path)
