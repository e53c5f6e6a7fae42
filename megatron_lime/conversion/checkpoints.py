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

lime_config.json = {"model": LimeConfig.to_dict(), "iteration": N, "consumed_samples": M,
"consumed_tokens": T, "tokenizer": path, "data_path": [...], "dataset_type": "gpt"|"sft", "args": {...}};
only "model" is required.

The consolidated format itself is the trainer's (megatron_lime/training/checkpointing.py:
save_consolidated / load_consolidated); `write_consolidated` only adds the atomic rename.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from megatron_lime.config import LimeConfig
from megatron_lime.conversion.weight_map import hf_config_to_lime, hf_to_lime_state_dict
from megatron_lime.training.checkpointing import CONSOLIDATED_WEIGHTS as WEIGHTS_FILE
from megatron_lime.training.checkpointing import LIME_CONFIG as LIME_CONFIG_FILE
from megatron_lime.training.checkpointing import read_json

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
    metadata = read_json(path)
    if "model" not in metadata:
        raise ValueError(f"{path}: no \"model\" entry (expected {{\"model\": LimeConfig.to_dict(), ...}})")
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
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    # An export also holds model.safetensors, so config.json decides.
    if (path / "config.json").is_file():
        return "hf"
    if (path / WEIGHTS_FILE).is_file() and (path / LIME_CONFIG_FILE).is_file():
        return "consolidated"
    if (path / "latest").is_file() or (path / "mp_rank_00_model_states.pt").is_file() \
            or any(path.glob("global_step*/mp_rank_00_model_states.pt")):
        return "deepspeed"
    raise FileNotFoundError(
        f"{path}: not a LIME checkpoint. Expected a DeepSpeed save dir (latest + global_stepN/), "
        f"a consolidated dir ({WEIGHTS_FILE} + {LIME_CONFIG_FILE}) or a Hugging Face export (config.json)")


def _deepspeed_tag_dir(save_dir: Path, tag: str | None) -> tuple[Path, Path, str]:
    """(save dir, tag dir, tag), accepting either the save dir or a tag dir itself."""
    if (save_dir / "mp_rank_00_model_states.pt").is_file() and tag is None:
        return save_dir.parent, save_dir, save_dir.name
    if tag is None:
        latest = save_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{latest}: missing; pass --tag (one of: "
                                    f"{', '.join(sorted(p.name for p in save_dir.glob('global_step*'))) or 'none found'})")
        tag = latest.read_text().strip()
    tag_dir = save_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{tag_dir}: checkpoint tag {tag!r} does not exist")
    return save_dir, tag_dir, tag


def read_deepspeed(save_dir: Path, tag: str | None = None) -> LimeWeights:
    save_dir, tag_dir, tag = _deepspeed_tag_dir(save_dir, tag)
    config_path = tag_dir / LIME_CONFIG_FILE
    if not config_path.is_file():
        # ds_to_universal does not copy our file: the source tag (name without the suffix) has it.
        config_path = save_dir / tag.removesuffix("_universal") / LIME_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{tag_dir / LIME_CONFIG_FILE}: missing; the trainer writes it beside every "
                                "DeepSpeed checkpoint and conversion needs its model config")
    config, metadata = read_lime_config(config_path)
    optimizer_files = sorted(tag_dir.glob("*_optim_states.pt"))
    state_dict = None
    if (tag_dir / "zero").is_dir():
        # A universal checkpoint (deepspeed.checkpoint.ds_to_universal): zero/<param>/fp32.pt each
        # hold one whole fp32 master parameter.
        state_dict = {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=False)["param"]
                      for p in sorted((tag_dir / "zero").iterdir()) if (p / "fp32.pt").is_file()}
        source = f"DeepSpeed universal checkpoint {tag_dir}: fp32 master weights"
    elif optimizer_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
            source = f"DeepSpeed checkpoint {tag_dir}: fp32 master weights from {len(optimizer_files)} rank(s)"
        except (ValueError, KeyError) as err:
            # e.g. a checkpoint saved without ZeRO, whose optimizer files hold no flat fp32 partitions
            logger.warning("%s: cannot gather fp32 master weights (%s); using the module weights instead",
                           tag_dir, err)
    if state_dict is None:
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: missing")
        saved = torch.load(model_file, map_location="cpu", weights_only=False)
        state_dict = saved["module"]
        dtype = next(iter(state_dict.values())).dtype
        source = f"DeepSpeed checkpoint {tag_dir}: module weights ({dtype}; no fp32 master weights found)"
    state_dict = _strip_wrapper_prefixes(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if k != "position_table"}
    validate_state_dict(state_dict, config, str(tag_dir))
    step = re.fullmatch(r"global_step(\d+)(_universal)?", tag)
    if "iteration" not in metadata and step:
        metadata["iteration"] = int(step.group(1))
    return LimeWeights(state_dict, config, metadata, "deepspeed", source)


def read_consolidated(directory: Path) -> LimeWeights:
    from megatron_lime.training.checkpointing import load_consolidated

    state_dict, metadata = load_consolidated(str(directory))
    config = LimeConfig.from_dict(metadata["model"])
    validate_state_dict(state_dict, config, str(directory / WEIGHTS_FILE))
    return LimeWeights(state_dict, config, metadata, "consolidated", f"consolidated checkpoint {directory}")


def write_consolidated(directory: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write DIR/model.safetensors + DIR/lime_config.json (the trainer's save_consolidated), atomically."""
    from megatron_lime.model import LimeModel
    from megatron_lime.training.checkpointing import save_consolidated

    if "model" not in metadata:
        raise ValueError("consolidated metadata needs a \"model\" entry (LimeConfig.to_dict())")
    config = LimeConfig.from_dict(metadata["model"])
    validate_state_dict(state_dict, config, f"weights for {directory}")
    with torch.device("meta"):
        model = LimeModel(config)
    model.load_state_dict(state_dict, assign=True)  # the tensors themselves, nothing copied
    with atomic_directory(Path(directory)) as tmp:
        save_consolidated(str(tmp), model, metadata)


def read_hf_export(directory: Path) -> LimeWeights:
    """Weights of a Hugging Face LIME folder (ours or one saved by save_pretrained), with megatron_lime names."""
    hf_config = read_json(directory / "config.json")
    config = hf_config_to_lime(hf_config, name=hf_config.get("lime_preset", "custom"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        hf_state = {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    else:
        hf_state = load_file(directory / WEIGHTS_FILE)
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
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    kind = detect_checkpoint_kind(path)
    if tag is not None and kind != "deepspeed":
        raise ValueError(f"{path}: --tag only applies to DeepSpeed checkpoints, this is a {kind} checkpoint")
    if kind == "deepspeed":
        return read_deepspeed(path, tag)
    if kind == "consolidated":
        return read_consolidated(path)
    return read_hf_export(path)


class atomic_directory:
    """`with atomic_directory(out) as tmp:` fill tmp; on success tmp replaces out, on error it is removed.

    Readers never see a half-written `out`: the final step is a rename within one filesystem.
    An existing `out` is replaced only after the new one is complete.
    """

    def __init__(self, target: Path):
        self.target = Path(target).absolute()
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old)
