"""The checkpoint format: where everything lives, what makes a checkpoint complete, how files are read.

The trainer (training/checkpointing.py) writes through this module and every reader (the trainer's
resume, conversion, generation) reads through it; nothing else knows a file name below.

DeepSpeed checkpoint (what `--save` writes, what `--load` resumes from):

    SAVE_DIR/
      latest                          "global_step200": names the newest COMPLETE tag; moved last
      global_step200/
        mp_rank_00_model_states.pt    weights + client state (iteration, consumed samples, ...)
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   AdamW state shard of data-parallel rank r
        rng_state_rank{r}.pt          python / numpy / torch (/ cuda) generators of rank r, as tensors
        ds_config.json                the resolved DeepSpeed config of the run
        lime_config.json              {"model", "iteration", "consumed_samples", "consumed_tokens",
                                       "tokenizer", "data_path", "dataset_type", "world_size", "args",
                                       "schedule"}: THE COMPLETION MARKER, written by rank 0 after every
                                       rank's files are on disk; `latest` is moved only after it
      global_step200_universal/       deepspeed.checkpoint.ds_to_universal's output (zero/<param>/fp32.pt);
                                      its lime_config.json is read from global_step200/
      latest_universal                written by ds_to_universal

A tag folder without lime_config.json is a save that was interrupted (kill -9, full disk): it is
ignored, with a warning, when resolving what to load, so it never blocks a start. Without a
`latest` file the newest complete tag is used.

Consolidated weights (also written by the Hugging Face converter's --from-hf):

    DIR/model.safetensors    LimeModel state dict (fp32 or bf16), the tied embedding stored once
    DIR/lime_config.json     same schema as above; only "model" is required

Loading: every `.pt` file is read with `torch.load(weights_only=True)`, which executes no pickled
code; the only classes allowed besides tensors and containers are the three DeepSpeed types its
ZeRO optimizer shards hold (deepspeed_safe_globals(); `getattr`, with which some Python 3.11
releases pickle an enum member, is mapped to a lookup of those enums' members only), and numpy
arrays in the RNG files of checkpoints written before RNG states were tensors. DeepSpeed's own
readers (engine.load_checkpoint, zero_to_fp32, the universal-checkpoint loader) call
`torch.load(..., weights_only=False)` themselves, so they are run inside `deepspeed_loads_safely()`,
the one place that redirects them.

Every error about a bad checkpoint is a CheckpointError whose message is one line naming the file
or tag and the reason.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from megatron_lime.files import follow_umask, read_json, write_json, write_text

logger = logging.getLogger(__name__)

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
LIME_CONFIG = "lime_config.json"
DS_CONFIG = "ds_config.json"
CONSOLIDATED_WEIGHTS = "model.safetensors"
MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL_SUFFIX = "_universal"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
# What `latest` may hold: a folder name, never a path (DeepSpeed allows any tag name, so do we).
_TAG_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file or tag and the reason."""


def tag_name(iteration: int) -> str:
    return f"global_step{iteration}"


def rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_state_rank{rank}.pt")


def optimizer_shards(tag_dir: str, rank: int | None = None) -> list[str]:
    """DeepSpeed's ZeRO optimizer shards in a tag folder (bf16_ prefixed or not), sorted; only `rank`'s if given."""
    rank_part = "*" if rank is None else str(rank)
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), f"*zero_pp_rank_{rank_part}_mp_rank_*_optim_states.pt")))


# ----------------------------------------------------------------------------------------------
# Loading .pt files without running pickled code


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes a DeepSpeed ZeRO stage 0-2 checkpoint holds (fp32 and bf16), and nothing else.

    Found by loading real shards with weights_only=True: the optimizer shards pickle the loss scaler,
    the ZeRO stage enum and the fragment addresses of the flat partitions.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Some Python 3.11 releases (3.11.2 here) pickle an enum member as getattr(EnumClass, "name"): `getattr`
    # maps to a function that only looks up members of these enums, never a general getattr.
    allowed_enums = (ZeroStageEnum,)

    def enum_member(enum_class: Any, name: str) -> Any:
        if enum_class not in allowed_enums:
            raise pickle.UnpicklingError(f"GLOBAL builtins.getattr on {enum_class!r} (only enum members of "
                                         f"{', '.join(e.__name__ for e in allowed_enums)} are allowed)")
        return enum_class[name]

    return [LossScaler, ZeroStageEnum, fragment_address, (enum_member, "builtins.getattr")]


def numpy_array_safe_globals() -> list[Any]:
    """What a numpy array pickles as: allowed only for the RNG files written before RNG states were tensors.

    Safe to allow: an array's items that are Python objects are unpickled through the same checks.
    Both module names, because numpy 1 wrote `numpy.core` where numpy 2 has `numpy._core`.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_torch_load = torch.load  # the real one, also while deepspeed_loads_safely() has replaced torch.load


def torch_load(path: str | os.PathLike, map_location: Any = "cpu", allow: Sequence[Any] = (), **kwargs: Any) -> Any:
    """torch.load with weights_only=True and the DeepSpeed allowlist (plus `allow`); a refused or corrupt file is a
    CheckpointError."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals([*deepspeed_safe_globals(), *allow]):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
        if found:
            held = found.group(1) or found.group(2)
            raise CheckpointError(f"{path}: refused to load: it holds {held}, which is not a tensor, a container or "
                                  f"an allowed DeepSpeed type (loading it could run code)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch file ({_first_line(err)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def deepspeed_loads_safely() -> Iterator[None]:
    """Within this block every torch.load is `torch_load` (weights_only=True, the allowlist).

    Why a patch: DeepSpeed's checkpoint readers (engine.load_checkpoint through its checkpoint
    engine, the ZeRO universal loader, deepspeed.utils.zero_to_fp32) pass weights_only=False to
    torch.load themselves and take no loader argument. Replacing torch.load for the duration of
    the load is the one place that covers all of them; the block is entered only around those
    calls, in one thread.
    """
    def safe_load(f, map_location=None, *args, **kwargs):
        if args:  # pickle_module positionally: never used by DeepSpeed, refuse rather than guess
            raise TypeError("torch.load: pass options by keyword inside deepspeed_loads_safely()")
        kwargs.pop("pickle_module", None)
        return torch_load(f, map_location=map_location, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _torch_load


# ----------------------------------------------------------------------------------------------
# lime_config.json


def read_lime_config(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict of a lime_config.json (or an export's lime_run.json); "model" is required."""
    try:
        metadata = read_json(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(metadata, dict) or "model" not in metadata:
        raise CheckpointError(f"{path}: no \"model\" entry (expected {{\"model\": LimeConfig.to_dict(), ...}})")
    return metadata


def mark_complete(tag_dir: str, meta: dict[str, Any]) -> None:
    """Write lime_config.json, the completion marker: call it after every rank's files are on disk."""
    write_json(os.path.join(tag_dir, LIME_CONFIG), meta)


def write_latest(save_dir: str, tag: str) -> None:
    """Point `latest` at `tag`; the tag must already be complete (latest never names anything else)."""
    if not is_complete(os.path.join(save_dir, tag)):
        raise CheckpointError(f"{os.path.join(save_dir, tag)}: not complete (no {LIME_CONFIG}); latest not moved")
    write_text(os.path.join(save_dir, LATEST), tag)


def is_complete(tag_dir: str) -> bool:
    """A tag folder whose save finished: lime_config.json and the model states are there.

    A universal folder is complete when ds_to_universal's zero/ and the source tag's marker are.
    """
    if not os.path.isfile(os.path.join(tag_dir, MODEL_STATES)):
        return False
    if tag_dir.rstrip(os.sep).endswith(UNIVERSAL_SUFFIX) and os.path.isdir(os.path.join(tag_dir, "zero")):
        return os.path.isfile(_universal_source_config(tag_dir)) or os.path.isfile(os.path.join(tag_dir, LIME_CONFIG))
    return os.path.isfile(os.path.join(tag_dir, LIME_CONFIG))


def _universal_source_config(tag_dir: str) -> str:
    tag_dir = os.path.normpath(tag_dir)
    return os.path.join(os.path.dirname(tag_dir), os.path.basename(tag_dir).removesuffix(UNIVERSAL_SUFFIX),
                        LIME_CONFIG)


def config_path_of(tag_dir: str) -> str:
    """The lime_config.json that describes a tag (a universal folder's is in its source tag)."""
    own = os.path.join(tag_dir, LIME_CONFIG)
    if os.path.isfile(own) or not os.path.normpath(tag_dir).endswith(UNIVERSAL_SUFFIX):
        return own
    return _universal_source_config(tag_dir)


def read_latest(save_dir: str, universal: bool = False) -> str | None:
    """The tag `latest` (or `latest_universal`) names; None when the file does not exist."""
    pointer = os.path.join(save_dir, LATEST_UNIVERSAL if universal else LATEST)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as handle:
            tag = handle.read().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer}: not text (expected a tag name such as global_step200)") from None
    if not tag:
        raise CheckpointError(f"{pointer}: empty (expected a tag name such as global_step200)")
    if not _TAG_NAME.match(tag) or tag in (".", ".."):
        raise CheckpointError(f"{pointer}: {tag[:60]!r} is not a tag name (expected e.g. global_step200)")
    return tag


def tag_dirs(save_dir: str) -> tuple[list[str], list[str]]:
    """(complete, incomplete) global_stepN folders of a save directory, oldest first."""
    if not os.path.isdir(save_dir):
        return [], []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(save_dir)
                   if (m := TAG_PATTERN.match(name)) and os.path.isdir(os.path.join(save_dir, name)))
    complete = [name for _, name in steps if is_complete(os.path.join(save_dir, name))]
    return complete, [name for _, name in steps if name not in complete]


def _warn_incomplete(save_dir: str, incomplete: list[str]) -> None:
    for name in incomplete:
        logger.warning("%s: ignored: an interrupted save (no %s); delete it when convenient",
                       os.path.join(save_dir, name), LIME_CONFIG)


# ----------------------------------------------------------------------------------------------
# What --load names


@dataclass
class LoadSource:
    kind: str  # "consolidated" or "deepspeed"
    path: str  # the consolidated dir, or the DeepSpeed save dir
    tag: str | None = None  # DeepSpeed tag (global_stepN or its universal folder)
    meta: dict[str, Any] | None = None  # lime_config.json when present

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.path, self.tag) if self.tag else self.path


def is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONSOLIDATED_WEIGHTS))


def holds_checkpoint(path: str) -> bool:
    """Whether `path` has anything --load could read. A fresh --save directory (only logs, or only an
    interrupted first save) has not: the run starts from scratch."""
    if not os.path.isdir(path):
        return False
    if is_consolidated(path) or os.path.isfile(os.path.join(path, MODEL_STATES)):
        return True
    if any(os.path.isfile(os.path.join(path, name)) for name in (LATEST, LATEST_UNIVERSAL)):
        return True
    complete, incomplete = tag_dirs(path)
    _warn_incomplete(path, incomplete)
    return bool(complete)


def resolve_load(path: str, universal: bool = False, tag: str | None = None) -> LoadSource:
    """Find what --load names: a consolidated dir, a DeepSpeed save dir (its `latest`, or `tag`), or a tag dir."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if is_consolidated(path) and tag is None:
        meta = read_lime_config(os.path.join(path, LIME_CONFIG)) if os.path.isfile(os.path.join(path, LIME_CONFIG)) \
            else None
        return LoadSource("consolidated", path, meta=meta)
    if tag is None and os.path.isfile(os.path.join(path, MODEL_STATES)):
        load_dir, tag = os.path.split(os.path.normpath(path))
        where = f"{path}"
    elif tag is not None:
        load_dir, where = path, f"--tag {tag}"
    else:
        load_dir = path
        tag = read_latest(path, universal)
        where = os.path.join(path, LATEST_UNIVERSAL if universal else LATEST)
        if tag is None:
            complete, incomplete = tag_dirs(path)
            _warn_incomplete(path, incomplete)
            if universal or not complete:
                raise CheckpointError(
                    f"{path}: no checkpoint: neither a consolidated checkpoint ({CONSOLIDATED_WEIGHTS}) nor a "
                    f"DeepSpeed save directory (no {os.path.basename(where)} file"
                    + (f", and {', '.join(incomplete)} are interrupted saves" if incomplete else "")
                    + ") nor a global_stepN directory")
            tag = complete[-1]
            logger.warning("%s: no %s file; using the newest complete checkpoint %s", path, LATEST, tag)
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        available = ", ".join(tag_dirs(load_dir)[0]) or "none found"
        raise CheckpointError(f"{where}: checkpoint tag {tag!r} does not exist ({tag_dir}; complete tags: {available})")
    if not os.path.isfile(os.path.join(tag_dir, MODEL_STATES)):
        raise CheckpointError(f"{tag_dir}: tag {tag!r} has no {MODEL_STATES} (an interrupted or damaged save)")
    meta_path = config_path_of(tag_dir)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{tag_dir}: tag {tag!r} has no {LIME_CONFIG} (an interrupted save, or not "
                              f"written by megatron-lime)")
    return LoadSource("deepspeed", load_dir, tag=tag, meta=read_lime_config(meta_path))


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


# ----------------------------------------------------------------------------------------------
# Consolidated weights


def save_consolidated(path: str, weights: torch.nn.Module | dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write DIR/model.safetensors (a LimeModel's state dict, tied embedding once) and DIR/lime_config.json.

    `meta` must hold "model" (LimeConfig.to_dict()); other keys of the lime_config schema are optional.
    The files are written in place: callers that need the folder to appear whole use files.atomic_directory.
    """
    from safetensors.torch import save_file

    if "model" not in meta:
        raise ValueError("save_consolidated: meta needs 'model' (LimeConfig.to_dict())")
    os.makedirs(path, exist_ok=True)
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    weights_file = os.path.join(path, CONSOLIDATED_WEIGHTS)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    follow_umask(weights_file)
    write_json(os.path.join(path, LIME_CONFIG), meta)


def load_consolidated(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, lime_config dict) of a consolidated directory; tensors keep their stored dtype."""
    weights = os.path.join(path, CONSOLIDATED_WEIGHTS)
    config_path = os.path.join(path, LIME_CONFIG)
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise CheckpointError(f"{needed}: missing; a consolidated checkpoint directory holds "
                                  f"{CONSOLIDATED_WEIGHTS} and {LIME_CONFIG}")
    return load_safetensors(weights), read_lime_config(config_path)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a damaged file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
