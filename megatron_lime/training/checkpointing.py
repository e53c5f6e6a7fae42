"""The trainer's side of checkpoints: what a run saves, when, and how it resumes.

The format (file names, `latest`, the completion record, safe loading, content hashes) is the
megatron_lime/checkpoint package's; this module decides what goes in: DeepSpeed's engine state, the RNG
state of every rank (as tensors, so it loads with weights_only=True) and the run's lime_config.json with
every file's content hash (each rank hashes what it wrote; rank 0 records them all). It also holds the
resume policy: the files are verified before DeepSpeed reads them, and the model and the learning-rate
schedule must match the run's (check_model_matches, check_schedule). To resume at
another data-parallel size, convert first:

    python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state \
        --input_folder SAVE_DIR/global_step200 --output_folder SAVE_DIR/global_step200_universal
    ... --load SAVE_DIR --universal-checkpoint

(ds_to_universal writes SAVE_DIR/latest_universal; the data position is kept in samples.)
`--load DIR` with a consolidated directory loads weights only (like --finetune). restore() is the one way in:
it decides from what --load names, checks, loads and returns where the run starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import resource
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from megatron_lime.checkpoint import (DS_CONFIG, LIME_CONFIG, MODEL_STATES, CheckpointError, LoadSource,
                                      deepspeed_loads_safely, holds_checkpoint, integrity, load_lime_weights,
                                      mark_complete, numpy_array_safe_globals, rank_files, read_lime_config,
                                      resolve_load, rng_file, tag_dirs, tag_name, torch_load, write_latest)
from megatron_lime.files import write_json
from megatron_lime.training.config import CheckpointConfig
from megatron_lime.training.metrics import Goodput


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
        written = [p for p in rank_files(tag_dir, rank) if os.path.isfile(p)]
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
    goodput: Goodput | None = None  # the run's accounting: saves count as blocking checkpoint time
    last_saved_iteration: int | None = None

    def due(self, iteration: int) -> bool:
        return bool(self.save_dir and self.save_interval and iteration % self.save_interval == 0)

    def save(self, engine, state: TrainState) -> str | None:
        """Write global_step{N}; move `latest` once every rank is done. Returns the tag dir (None without --save)."""
        if not self.save_dir or self.last_saved_iteration == state.iteration:
            return None
        with self.goodput.phase("checkpoint") if self.goodput else contextlib.nullcontext():
            return self._save(engine, state)

    def _save(self, engine, state: TrainState) -> str:
        import torch.distributed as dist

        tag = tag_name(state.iteration)
        tag_dir = os.path.join(self.save_dir, tag)
        try:
            engine.save_checkpoint(self.save_dir, tag=tag, client_state={"lime": state.to_dict()}, save_latest=False)
            os.makedirs(tag_dir, exist_ok=True)
            torch.save(rng_state(), rng_file(tag_dir, self.rank))
            if self.rank == 0:
                write_json(os.path.join(tag_dir, DS_CONFIG), self.ds_config)
            # Hashed by the rank that wrote them, right after writing (still in the page cache).
            mine = integrity.hash_files(tag_dir, rank_files(tag_dir, self.rank))
        except (OSError, RuntimeError) as err:
            failure = write_failure(tag_dir, err, self.rank)
            if failure is None:  # not a write error (a peer's failure in a collective): reported as it is
                raise
            raise failure from None
        # Every rank's shard and RNG state is on disk once its record arrives; rank 0 gets them all.
        records = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, records, dst=0)
        if self.rank == 0:  # the record, then latest: latest only ever names a complete tag
            files = {name: digest for record in records for name, digest in sorted(record.items())}
            mark_complete(tag_dir, {**self.meta_base, **state.to_dict()}, files=files)
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
            raise CheckpointError(
                f"{tag_dir}: saved with data-parallel size {saved_world}, this run has {self.world_size}. "
                f"Convert it to a universal checkpoint and resume with --universal-checkpoint:\n"
                f"  python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state "
                f"--input_folder {tag_dir} --output_folder {tag_dir}_universal")
        if not universal:
            self.verify(source, [MODEL_STATES] if weights_only else None)
        with deepspeed_loads_safely():
            load_path, client_state = engine.load_checkpoint(
                source.path, tag=source.tag, load_module_only=weights_only,
                load_optimizer_states=not weights_only, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {source.tag_dir}")
        if weights_only:
            return TrainState()
        if not client_state or "lime" not in client_state:
            raise CheckpointError(f"{load_path}: no training state in the checkpoint (not written by megatron-lime?)")
        state = TrainState(**client_state["lime"])
        rng_path = rng_file(source.tag_dir, self.rank)
        if os.path.isfile(rng_path) and saved_world == self.world_size:
            load_rng_state(rng_path)
        self.last_saved_iteration = state.iteration
        return state

    def verify(self, source: LoadSource, names: list[str] | None) -> None:
        """Check the tag's files (`names`, or all the record lists) against their hashes before DeepSpeed reads
        them, shared out over the ranks (each checks every world_size-th file); every rank stops with the
        same one-line CheckpointError, which names the newest earlier checkpoint that verifies."""
        import torch.distributed as dist

        record = integrity.record_of(source.meta)
        if record is None:
            if self.rank == 0:
                integrity.warn_unverified(source.tag_dir)
            return
        names = sorted(record) if names is None else names
        problem = None
        try:
            integrity.verify(source.tag_dir, source.meta, names[self.rank::self.world_size])
        except CheckpointError as err:
            problem = str(err)
        found = [None] * self.world_size
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
        if problem is None:
            return
        advice = [newest_verified_before(source.path, source.tag) if self.rank == 0 else None]
        dist.broadcast_object_list(advice, src=0)
        raise CheckpointError(f"{problem}; resume stopped: {advice[0]}")


def newest_verified_before(save_dir: str, tag: str) -> str:
    """Where to resume from when `tag` fails verification: the newest earlier complete tag whose files all
    match their recorded hashes (checked here, in full), as advice for the one-line error."""
    complete, _ = tag_dirs(save_dir)
    earlier = complete[:complete.index(tag)] if tag in complete else complete
    for name in reversed(earlier):
        tag_dir = os.path.join(save_dir, name)
        try:
            meta = read_lime_config(os.path.join(tag_dir, LIME_CONFIG))
        except CheckpointError:
            continue
        if integrity.record_of(meta) is not None and not integrity.problems(tag_dir, meta, first_only=True):
            return (f"the newest earlier checkpoint that verifies is {tag_dir}: resume from it with "
                    f"--load {tag_dir} (or write {name} into {os.path.join(save_dir, 'latest')})")
    return f"no earlier checkpoint in {save_dir} verifies (restore the files, or start again without --load)"


# ----------------------------------------------------------------------------------------------
# Where a run starts: what --load names (the table in training/README.md)


def find_load_source(options: CheckpointConfig, say: Callable[[str], None]) -> LoadSource | None:
    """What --load names; a missing/empty directory starts from scratch (so --load == --save auto-resumes)."""
    path = options.load
    if not path:
        return None
    if not holds_checkpoint(path) and not options.finetune:
        say(f"WARNING: --load {path} holds no checkpoint yet: starting from scratch")
        return None
    return resolve_load(path, options.universal_checkpoint)


def restore(engine, checkpointer: Checkpointer, options: CheckpointConfig, model: dict[str, Any],
            schedule: dict[str, Any], global_batch: int, say: Callable[[str], None]) -> TrainState:
    """Load what --load names into the wrapped model and return where the run starts.

    - a DeepSpeed save: the full state (weights, AdamW state, step, data position, RNG), or with --finetune its
      weights only, through DeepSpeed's own loader (checkpointer.resume);
    - a consolidated folder: weights only (load_lime_weights, verified), copied into the module, then DeepSpeed's
      fp32 master copy is refreshed from them, as DeepSpeed's own weights-only load does;
    - nothing: a run from scratch.
    The checkpoint's model must be this run's (check_model_matches), and a full resume must continue its
    learning-rate schedule (check_schedule) and its global batch.
    """
    source = find_load_source(options, say)
    if source is None:
        return TrainState()
    if source.meta is not None:
        check_model_matches(source.meta["model"], model, f"--load {source.path}")
    check_schedule(source, schedule, options.override_lr_scheduler, options.finetune, say)
    if source.kind == "deepspeed":
        state = checkpointer.resume(engine, source, options.finetune, options.universal_checkpoint)
        say(f"> loaded {os.path.join(source.path, source.tag)}: "
            + ("weights only (fresh optimizer, step 0)" if options.finetune else
               f"iteration {state.iteration}, consumed samples {state.consumed_samples}"))
    else:
        weights = load_lime_weights(source.path)
        engine.module.load_weights(weights.state_dict, source.path)
        if hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()
        state = TrainState()
        say(f"> loaded weights from {weights.source} (fresh optimizer, step 0)")
    if state.consumed_samples != state.iteration * global_batch:
        raise CheckpointError(f"{source.path}: the checkpoint at iteration {state.iteration} has consumed "
                              f"{state.consumed_samples} samples; with --global-batch-size {global_batch} the run "
                              f"would not continue where it stopped (changing the global batch size mid-run is not "
                              f"supported)")
    return state


# ----------------------------------------------------------------------------------------------
# Resume policy: what may differ between the checkpoint and this run


def check_model_matches(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Architecture fields must agree (name, attention backend and loss chunk size may differ)."""
    ignore = {"name", "attention_backend", "loss_chunk_size"}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}"
             for k in current if k not in ignore and k in saved and saved[k] != current[k]]
    if diffs:
        raise CheckpointError(f"{where}: the checkpoint's model differs from this run's: " + "; ".join(diffs))


def check_schedule(source: LoadSource | None, current: dict[str, Any], override: bool, finetune: bool,
                   log: Callable[[str], None]) -> None:
    """A full resume must continue the schedule it was saved with (as Megatron-LM insists).

    `current` is the run's lime_config "schedule" entry. Differences stop the run with every one
    listed, unless `override` (--override-lr-scheduler): then the new schedule applies, and is logged.
    Weights-only loads (--finetune, consolidated) start a fresh schedule and are not checked.
    """
    if source is None or source.kind != "deepspeed" or finetune:
        return
    saved = (source.meta or {}).get("schedule")
    if saved is None:  # written before the schedule was recorded: nothing to compare against
        return
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in current.items()
             if key in saved and not _same(saved[key], value)]
    if not diffs:
        return
    if not override:
        raise CheckpointError(f"{source.tag_dir}: the learning-rate schedule differs from the checkpoint's: "
                              + "; ".join(diffs) + ". Pass --override-lr-scheduler to continue with the new one")
    log(f"> --override-lr-scheduler: the new learning-rate schedule applies from here ({'; '.join(diffs)})")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b

