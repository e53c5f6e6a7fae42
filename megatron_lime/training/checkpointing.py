"""Checkpoints: DeepSpeed's for resuming, and our consolidated format for weights.

DeepSpeed checkpoint (what `--save` writes, what `--load` resumes from):

    SAVE_DIR/
      latest                          "global_step200": written last, atomically, by rank 0
      global_step200/
        mp_rank_00_model_states.pt    weights + client state (iteration, consumed samples, ...)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   AdamW state shard of data-parallel rank r
        rng_state_rank{r}.pt          python / numpy / torch (/ cuda) generators of rank r
        lime_config.json              {"model", "iteration", "consumed_samples", "consumed_tokens",
                                       "tokenizer", "data_path", "dataset_type", "world_size", "args"}
        ds_config.json                the resolved DeepSpeed config of the run

`latest` moves only after every rank has finished writing, so a crash during a save leaves
the previous checkpoint usable. To resume at another data-parallel size, convert first:

    python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \
        --input_folder SAVE_DIR/global_step200 --output_folder SAVE_DIR/global_step200_universal
    ... --load SAVE_DIR --universal-checkpoint

(ds_to_universal writes SAVE_DIR/latest_universal; the data position is kept in samples.)

Consolidated weights (also written by the Hugging Face converter's --from-hf):

    DIR/model.safetensors    LimeModel state dict (fp32 or bf16), the tied embedding stored once
    DIR/lime_config.json     same schema as above; only "model" is required

`--load DIR` with a consolidated directory loads weights only (like --finetune).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
LIME_CONFIG = "lime_config.json"
DS_CONFIG = "ds_config.json"
CONSOLIDATED_WEIGHTS = "model.safetensors"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")


@dataclass
class TrainState:
    """Where the run is: what a resumed run needs besides weights and optimizer state."""

    iteration: int = 0  # optimizer steps taken (skipped steps included)
    consumed_samples: int = 0  # samples of the training set used so far (the data position)
    consumed_tokens: int = 0  # samples x sequence length
    skipped_steps: int = 0  # steps skipped for a NaN/inf loss, in all

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def write_json_atomic(path: str, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err


# ----------------------------------------------------------------------------------------------
# Consolidated weights


def save_consolidated(path: str, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write DIR/model.safetensors (the model's state dict, tied embedding once) and DIR/lime_config.json.

    `meta` must hold "model" (LimeConfig.to_dict()); other keys of the lime_config schema are optional.
    """
    from safetensors.torch import save_file

    if "model" not in meta:
        raise ValueError("save_consolidated: meta needs 'model' (LimeConfig.to_dict())")
    os.makedirs(path, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, os.path.join(path, CONSOLIDATED_WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(os.path.join(path, LIME_CONFIG), meta)


def load_consolidated(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, lime_config dict) of a consolidated directory; tensors keep their stored dtype."""
    from safetensors.torch import load_file

    weights = os.path.join(path, CONSOLIDATED_WEIGHTS)
    config_path = os.path.join(path, LIME_CONFIG)
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{needed}: missing; a consolidated checkpoint directory holds "
                                    f"{CONSOLIDATED_WEIGHTS} and {LIME_CONFIG}")
    meta = read_json(config_path)
    if "model" not in meta:
        raise ValueError(f"{config_path}: no 'model' entry (LimeConfig fields)")
    return load_file(weights), meta


def holds_checkpoint(path: str) -> bool:
    """Whether `path` has anything --load could read (a fresh --save directory, e.g. with only logs, has not)."""
    if not os.path.isdir(path):
        return False
    markers = {LATEST, LATEST_UNIVERSAL, CONSOLIDATED_WEIGHTS, "mp_rank_00_model_states.pt"}
    return any(name in markers or TAG_PATTERN.match(name) for name in os.listdir(path))


def is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONSOLIDATED_WEIGHTS))


# ----------------------------------------------------------------------------------------------
# Where --load points


@dataclass
class LoadSource:
    kind: str  # "consolidated" or "deepspeed"
    path: str  # the consolidated dir, or the DeepSpeed save dir
    tag: str | None = None  # DeepSpeed tag (global_stepN or its universal folder)
    meta: dict[str, Any] | None = None  # lime_config.json when present


def resolve_load(path: str, universal: bool) -> LoadSource:
    """Find what --load names: a consolidated dir, a DeepSpeed save dir (via latest), or one tag dir."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load {path}: no such directory")
    if is_consolidated(path):
        meta = read_json(os.path.join(path, LIME_CONFIG)) if os.path.isfile(os.path.join(path, LIME_CONFIG)) else None
        return LoadSource("consolidated", path, meta=meta)
    pointer = os.path.join(path, LATEST_UNIVERSAL if universal else LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as handle:
            tag = handle.read().strip()
        load_dir = path
    elif os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):
        load_dir, tag = os.path.split(os.path.normpath(path))
    else:
        raise FileNotFoundError(
            f"--load {path}: neither a consolidated checkpoint ({CONSOLIDATED_WEIGHTS}) nor a DeepSpeed "
            f"save directory (no {os.path.basename(pointer)} file) nor a global_stepN directory")
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{pointer}: names {tag!r} but {tag_dir} does not exist")
    meta_path = os.path.join(tag_dir, LIME_CONFIG)
    if not os.path.isfile(meta_path) and universal:
        # ds_to_universal does not copy our file; the source tag (name without the suffix) has it.
        meta_path = os.path.join(load_dir, re.sub(r"_universal$", "", tag), LIME_CONFIG)
    meta = read_json(meta_path) if os.path.isfile(meta_path) else None
    return LoadSource("deepspeed", load_dir, tag=tag, meta=meta)


def check_model_matches(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Architecture fields must agree (name, attention backend and loss chunk size may differ)."""
    ignore = {"name", "attention_backend", "loss_chunk_size"}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}"
             for k in current if k not in ignore and k in saved and saved[k] != current[k]]
    if diffs:
        raise ValueError(f"{where}: the checkpoint's model differs from this run's: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The checkpointer the loop calls


class Checkpointer:
    """Saves every --save-interval steps (and when asked), loads what --load names.

    meta_base: the lime_config.json entries fixed for the run (model, tokenizer, data_path,
    dataset_type, args, world_size); iteration and consumed counts are added per save.
    """

    def __init__(self, save_dir: str | None, save_interval: int | None, keep_last: int | None,
                 meta_base: dict[str, Any], ds_config: dict[str, Any], rank: int, world_size: int):
        self.save_dir = save_dir
        self.save_interval = save_interval
        self.keep_last = keep_last
        self.meta_base = meta_base
        self.ds_config = ds_config
        self.rank = rank
        self.world_size = world_size
        self.last_saved_iteration: int | None = None

    def due(self, iteration: int) -> bool:
        return bool(self.save_dir and self.save_interval and iteration % self.save_interval == 0)

    def save(self, engine, state: TrainState) -> str | None:
        """Write global_step{N}; move `latest` once every rank is done. Returns the tag dir (None without --save)."""
        import torch.distributed as dist

        if not self.save_dir or self.last_saved_iteration == state.iteration:
            return None
        tag = f"global_step{state.iteration}"
        tag_dir = os.path.join(self.save_dir, tag)
        engine.save_checkpoint(self.save_dir, tag=tag, client_state={"lime": state.to_dict()}, save_latest=False)
        os.makedirs(tag_dir, exist_ok=True)
        torch.save(rng_state(), os.path.join(tag_dir, f"rng_state_rank{self.rank}.pt"))
        if self.rank == 0:
            meta = {**self.meta_base, **state.to_dict()}
            write_json_atomic(os.path.join(tag_dir, LIME_CONFIG), meta)
            write_json_atomic(os.path.join(tag_dir, DS_CONFIG), self.ds_config)
        dist.barrier()  # every rank's shard and RNG state is on disk
        if self.rank == 0:
            write_text_atomic(os.path.join(self.save_dir, LATEST), tag)
            self._prune(keep=tag)
        dist.barrier()
        self.last_saved_iteration = state.iteration
        return tag_dir

    def _prune(self, keep: str) -> None:
        if not self.keep_last:
            return
        steps = sorted((int(m.group(1)), name) for name in os.listdir(self.save_dir)
                       if (m := TAG_PATTERN.match(name)) and os.path.isdir(os.path.join(self.save_dir, name)))
        for _, name in steps[:-self.keep_last]:
            if name != keep:
                shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)

    def resume(self, engine, source: LoadSource, weights_only: bool, universal: bool) -> TrainState:
        """Load a DeepSpeed checkpoint into the engine; full state unless weights_only."""
        saved_world = (source.meta or {}).get("world_size")
        if not weights_only and not universal and saved_world not in (None, self.world_size):
            tag_dir = os.path.join(source.path, source.tag)
            raise RuntimeError(
                f"{tag_dir}: saved with data-parallel size {saved_world}, this run has {self.world_size}. "
                f"Convert it to a universal checkpoint and resume with --universal-checkpoint:\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state "
                f"--input_folder {tag_dir} --output_folder {tag_dir}_universal")
        load_path, client_state = engine.load_checkpoint(
            source.path, tag=source.tag, load_module_only=weights_only,
            load_optimizer_states=not weights_only, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {os.path.join(source.path, source.tag)}")
        if weights_only:
            return TrainState()
        if not client_state or "lime" not in client_state:
            raise RuntimeError(f"{load_path}: no training state in the checkpoint (not written by megatron-lime?)")
        state = TrainState(**client_state["lime"])
        rng_path = os.path.join(source.path, source.tag, f"rng_state_rank{self.rank}.pt")
        if os.path.isfile(rng_path) and saved_world == self.world_size:
            set_rng_state(torch.load(rng_path, weights_only=False))
        self.last_saved_iteration = state.iteration
        return state
