"""The trainer's side of checkpoints: what a run saves, when, and how it resumes.

The format (file names, `latest`, the completion marker, safe loading) is megatron_lime/checkpoint.py's;
this module only decides what goes in: DeepSpeed's engine state, the RNG state of every rank
(as tensors, so it loads with weights_only=True) and the run's lime_config.json. To resume at
another data-parallel size, convert first:

    python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \
        --input_folder SAVE_DIR/global_step200 --output_folder SAVE_DIR/global_step200_universal
    ... --load SAVE_DIR --universal-checkpoint

(ds_to_universal writes SAVE_DIR/latest_universal; the data position is kept in samples.)
`--load DIR` with a consolidated directory loads weights only (like --finetune).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import resource
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_lime.checkpoint import (DS_CONFIG, LIME_CONFIG, MODEL_STATES, CheckpointError, LoadSource,
                                      deepspeed_loads_safely, mark_complete, numpy_array_safe_globals,
                                      optimizer_shards, rng_file, tag_dirs, tag_name, torch_load, write_latest)
from megatron_lime.files import write_json


@dataclass
class TrainState:
    """Where the run is: what a resumed run needs besides weights and optimizer state."""

    iteration: int = 0  # optimizer steps taken (skipped steps included)
    consumed_samples: int = 0  # samples of the training set used so far (the data position)
    consumed_tokens: int = 0  # samples x sequence length
    skipped_steps: int = 0  # steps skipped for a NaN/inf loss, in all

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and numbers (nothing that needs pickled classes to load)."""
    version, python_words, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(python_words, dtype=torch.int64),
                        "gauss": python_gauss},
             "numpy": {"keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                       "has_gauss": int(numpy_has_gauss), "gauss": float(numpy_gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    if isinstance(python, tuple):  # written before RNG states were tensors: random.getstate(), np.random.get_state()
        random.setstate(python)
        np.random.set_state(numpy)
    else:
        random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
        np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                             numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(path: str) -> None:
    """Set every generator from a rank's RNG file, this format or the earlier one (numpy arrays, tuples)."""
    set_rng_state(torch_load(path, allow=numpy_array_safe_globals()))


# ----------------------------------------------------------------------------------------------
# A save that cannot write

# torch.save's zip writer reports a failed write without the OS reason ("unexpected pos ...", "file write failed").
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed")
_LOW_SPACE_BYTES = 64 << 20


def write_failure(tag_dir: str, error: BaseException, rank: int) -> CheckpointError | None:
    """A one-line error naming the file a failed save was writing and why; None if `error` is not a write failure.

    The file is the most recently written of the files this rank writes (its ZeRO shard and RNG state; on
    rank 0 also the model states and ds_config.json): the write that failed, since the ranks write into one
    folder at once. The reason is the OS's where the error carries it, else found out: the file size limit
    (ulimit -f) reached, or the disk (nearly) full.
    """
    if isinstance(error, OSError):
        path, reason = error.filename, error.strerror or str(error)
    elif _TORCH_WRITE_FAILURE.search(str(error)):
        path, reason = None, None
    else:
        return None
    if path is None:
        mine = optimizer_shards(tag_dir, rank) + [rng_file(tag_dir, rank)]
        if rank == 0:
            mine += [os.path.join(tag_dir, MODEL_STATES), os.path.join(tag_dir, DS_CONFIG)]
        written = [p for p in mine if os.path.isfile(p)]
        path = max(written, key=os.path.getmtime) if written else tag_dir
    if reason is None:
        size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        free = shutil.disk_usage(tag_dir if os.path.isdir(tag_dir) else os.path.dirname(tag_dir)).free
        if size_limit != resource.RLIM_INFINITY and os.path.isfile(path) and os.path.getsize(path) >= size_limit:
            reason = f"File too large (the file size limit, ulimit -f, is {size_limit} bytes)"
        elif free < _LOW_SPACE_BYTES:
            reason = f"No space left on device ({free >> 20} MiB free)"
        else:
            reason = f"write failed ({str(error).strip().splitlines()[0][:200]})"
    return CheckpointError(f"{path}: cannot write the checkpoint: {reason}; {tag_dir} stays incomplete "
                           f"(no {LIME_CONFIG}), so resuming skips it")


# ----------------------------------------------------------------------------------------------
# The checkpointer the loop calls


@dataclass
class Checkpointer:
    """Saves every --save-interval steps (and when asked), loads what --load names.

    meta_base: the lime_config.json entries fixed for the run (model, tokenizer, data_path,
    dataset_type, args, world_size); iteration and consumed counts are added per save.
    """

    save_dir: str | None
    save_interval: int | None
    keep_last: int | None
    meta_base: dict[str, Any]
    ds_config: dict[str, Any]
    rank: int
    world_size: int
    last_saved_iteration: int | None = None

    def due(self, iteration: int) -> bool:
        return bool(self.save_dir and self.save_interval and iteration % self.save_interval == 0)

    def save(self, engine, state: TrainState) -> str | None:
        """Write global_step{N}; move `latest` once every rank is done. Returns the tag dir (None without --save)."""
        import torch.distributed as dist

        if not self.save_dir or self.last_saved_iteration == state.iteration:
            return None
        tag = tag_name(state.iteration)
        tag_dir = os.path.join(self.save_dir, tag)
        try:
            engine.save_checkpoint(self.save_dir, tag=tag, client_state={"lime": state.to_dict()}, save_latest=False)
            os.makedirs(tag_dir, exist_ok=True)
            torch.save(rng_state(), rng_file(tag_dir, self.rank))
            if self.rank == 0:
                write_json(os.path.join(tag_dir, DS_CONFIG), self.ds_config)
        except (OSError, RuntimeError) as err:
            failure = write_failure(tag_dir, err, self.rank)
            if failure is None:  # not a write error (a peer's failure in a collective): reported as it is
                raise
            raise failure from None
        dist.barrier()  # every rank's shard and RNG state is on disk
        if self.rank == 0:  # the marker, then latest: latest only ever names a complete tag
            mark_complete(tag_dir, {**self.meta_base, **state.to_dict()})
            write_latest(self.save_dir, tag)
            self._prune(keep=tag)
        dist.barrier()
        self.last_saved_iteration = state.iteration
        return tag_dir

    def _prune(self, keep: str) -> None:
        if not self.keep_last:
            return
        complete, _ = tag_dirs(self.save_dir)  # interrupted saves are the user's to inspect, never pruned
        for name in complete[:-self.keep_last]:
            if name != keep:
                shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)

    def resume(self, engine, source: LoadSource, weights_only: bool, universal: bool) -> TrainState:
        """Load a DeepSpeed checkpoint into the engine; full state unless weights_only."""
        saved_world = (source.meta or {}).get("world_size")
        if not weights_only and not universal and saved_world not in (None, self.world_size):
            tag_dir = source.tag_dir
            raise RuntimeError(
                f"{tag_dir}: saved with data-parallel size {saved_world}, this run has {self.world_size}. "
                f"Convert it to a universal checkpoint and resume with --universal-checkpoint:\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state "
                f"--input_folder {tag_dir} --output_folder {tag_dir}_universal")
        with deepspeed_loads_safely():
            load_path, client_state = engine.load_checkpoint(
                source.path, tag=source.tag, load_module_only=weights_only,
                load_optimizer_states=not weights_only, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {source.tag_dir}")
        if weights_only:
            return TrainState()
        if not client_state or "lime" not in client_state:
            raise RuntimeError(f"{load_path}: no training state in the checkpoint (not written by megatron-lime?)")
        state = TrainState(**client_state["lime"])
        rng_path = rng_file(source.tag_dir, self.rank)
        if os.path.isfile(rng_path) and saved_world == self.world_size:
            load_rng_state(rng_path)
        self.last_saved_iteration = state.iteration
        return state
