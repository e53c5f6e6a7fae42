"""The safetensors layouts: a consolidated folder (model.safetensors + lime_config.json) and the weights of a
Hugging Face export (model.safetensors, or shards named by model.safetensors.index.json).

Both are checked against their record's content hashes (integrity.py) before a tensor is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megatron_lime.checkpoint import integrity
from megatron_lime.checkpoint.format import (CONSOLIDATED_WEIGHTS, EXPORT_RUN_FILE, HF_CONFIG, HF_WEIGHTS_INDEX,
                                             LIME_CONFIG, CheckpointError, first_line,
                                             read_lime_config)
from megatron_lime.checkpoint.safe_load import load_safetensors
from megatron_lime.config import LimeConfig
from megatron_lime.files import atomic_directory, follow_umask, read_json, write_json
from megatron_lime.model import LimeModel


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      algorithm: str = integrity.HASH_ALGORITHM) -> str:
    """Write `tensors` (contiguous CPU copies are made) to a .safetensors file; returns its content hash.

    The caller makes the folder appear whole (files.atomic_directory); the hash is taken right after the
    write, while the bytes are still in the page cache.
    """
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    follow_umask(path)
    return integrity.file_hash(path, algorithm)


def write_consolidated(directory: str | os.PathLike, weights: torch.nn.Module | dict[str, torch.Tensor],
                       metadata: dict[str, Any]) -> None:
    """Write DIR/model.safetensors (a LimeModel's state dict, tied embedding once) + DIR/lime_config.json.

    `metadata` must hold "model" (LimeConfig.to_dict()); other keys of the lime_config schema are optional
    (a "files" entry from an earlier record is replaced by the new weights' hash). The weights must fit
    the config. The folder is built beside `directory` and renamed into place when complete.
    """
    if "model" not in metadata:
        raise ValueError("consolidated metadata needs a \"model\" entry (LimeConfig.to_dict())")
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    config = LimeConfig.from_dict(metadata["model"])
    state_dict = LimeModel.checked_weights(state_dict, config, f"weights for {directory}")
    with atomic_directory(Path(directory)) as tmp:
        record = {CONSOLIDATED_WEIGHTS: write_safetensors(tmp / CONSOLIDATED_WEIGHTS, state_dict)}
        write_json(tmp / LIME_CONFIG, {**metadata, integrity.RECORD_KEY: record})


def read_consolidated(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, lime_config dict) of a consolidated folder, its weights verified; tensors keep their dtype."""
    weights = os.path.join(directory, CONSOLIDATED_WEIGHTS)
    config_path = os.path.join(directory, LIME_CONFIG)
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise CheckpointError(f"{needed}: missing; a consolidated checkpoint directory holds "
                                  f"{CONSOLIDATED_WEIGHTS} and {LIME_CONFIG}")
    metadata = read_lime_config(config_path)
    integrity.verify(directory, metadata, [CONSOLIDATED_WEIGHTS])
    return load_safetensors(weights), metadata


def export_weight_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a Hugging Face folder: the shards its index names, else model.safetensors."""
    index = os.path.join(directory, HF_WEIGHTS_INDEX)
    if not os.path.isfile(index):
        return [CONSOLIDATED_WEIGHTS]
    try:
        return sorted(set(read_json(index)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index ({first_line(err)})") from None


def read_export(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(config.json, Hugging Face-named tensors, the run record lime_run.json or {}) of an export; every file the
    record lists (config, weights, tokenizer files, code, card) is verified first."""
    try:
        hf_config = read_json(os.path.join(directory, HF_CONFIG))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    run_file = os.path.join(directory, EXPORT_RUN_FILE)
    run = read_lime_config(run_file) if os.path.isfile(run_file) else {}
    integrity.verify(directory, run)
    shards = export_weight_files(directory)
    tensors = {k: v for shard in shards for k, v in load_safetensors(os.path.join(directory, shard)).items()}
    return hf_config, tensors, run
