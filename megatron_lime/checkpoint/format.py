"""The checkpoint format: every file name, tags and `latest`, the completion record, what --load names.

Nothing outside megatron_lime/checkpoint/ knows a file name below. Three layouts:

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
                                       "schedule", "files"}: THE COMPLETION RECORD, written by rank 0 after
                                       every rank's files are on disk; `latest` is moved only after it.
                                       "files" maps every other file of the tag to its content hash
                                       (integrity.py), each hashed by the rank that wrote it
      global_step200_universal/       deepspeed.checkpoint.ds_to_universal's output (zero/<param>/fp32.pt);
                                      its lime_config.json is read from global_step200/
      latest_universal                written by ds_to_universal

A tag folder without lime_config.json is a save that was interrupted (kill -9, full disk): it is
ignored, with a warning, when resolving what to load, so it never blocks a start. Without a
`latest` file the newest complete tag is used.

Consolidated weights (also written by the Hugging Face converter's --from-hf):

    DIR/model.safetensors    LimeModel state dict (fp32 or bf16), the tied embedding stored once
    DIR/lime_config.json     same schema as above; only "model" is required ("files": the weights' hash)

Hugging Face export (conversion/hf_export.py writes it):

    DIR/config.json (model_type "lime"), model.safetensors (or shards + model.safetensors.index.json),
    tokenizer files, remote code, README.md, and lime_run.json: the run's record, whose "files"
    holds the hash of every other file (checked by the export's own modeling_lime.py too)

Every error about a bad checkpoint is a CheckpointError whose message is one line naming the file
or tag and the reason.
"""


from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from megatron_lime.errors import LimeInputError
from megatron_lime.files import read_json, write_json, write_text

logger = logging.getLogger(__name__)

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
LIME_CONFIG = "lime_config.json"
DS_CONFIG = "ds_config.json"
CONSOLIDATED_WEIGHTS = "model.safetensors"
MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_PARAMS = "zero"  # <universal tag>/zero/<param>/fp32.pt
UNIVERSAL_PARAM_FILE = "fp32.pt"
HF_CONFIG = "config.json"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
# The run's record inside a Hugging Face export. Not named lime_config.json: the trainer takes a
# folder with model.safetensors + lime_config.json for a consolidated checkpoint, and an export's
# weights have Hugging Face names (convert it back with --from-hf).
EXPORT_RUN_FILE = "lime_run.json"
Layout = Literal["deepspeed", "consolidated", "hf"]
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
# What `latest` may hold: a folder name, never a path (DeepSpeed allows any tag name, so do we).
_TAG_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class CheckpointError(LimeInputError):
    """A checkpoint that cannot be used; the message is one line naming the file or tag and the reason."""


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def tag_name(iteration: int) -> str:
    return f"global_step{iteration}"


def rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_state_rank{rank}.pt")


def optimizer_shards(tag_dir: str, rank: int | None = None) -> list[str]:
    """DeepSpeed's ZeRO optimizer shards in a tag folder (bf16_ prefixed or not), sorted; only `rank`'s if given."""
    rank_part = "*" if rank is None else str(rank)
    return sorted(glob.glob(os.path.join(glob.escape(tag_dir), f"*zero_pp_rank_{rank_part}_mp_rank_*_optim_states.pt")))


def rank_files(tag_dir: str, rank: int) -> list[str]:
    """The files of a tag that data-parallel rank `rank` writes: its optimizer shard and RNG state; rank 0 also
    the model states and ds_config.json. Together over all ranks: every file of the tag but lime_config.json."""
    mine = optimizer_shards(tag_dir, rank) + [rng_file(tag_dir, rank)]
    if rank == 0:
        mine += [os.path.join(tag_dir, MODEL_STATES), os.path.join(tag_dir, DS_CONFIG)]
    return mine


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


def mark_complete(tag_dir: str, meta: dict[str, Any], files: dict[str, str] | None = None) -> None:
    """Write lime_config.json, the completion record: call it after every rank's files are on disk.

    `files` (name in the tag -> content hash, integrity.file_hash) is recorded under "files"."""
    write_json(os.path.join(tag_dir, LIME_CONFIG), {**meta, **({"files": files} if files is not None else {})})


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


def detect_layout(path: str | os.PathLike) -> Layout:
    """Which of the three layouts `path` holds (a CheckpointError naming what was expected if none)."""
    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    # An export also holds model.safetensors, so config.json decides.
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        return "hf"
    if is_consolidated(path) and os.path.isfile(os.path.join(path, LIME_CONFIG)):
        return "consolidated"
    if holds_checkpoint(path):
        return "deepspeed"
    raise CheckpointError(
        f"{path}: not a LIME checkpoint. Expected a DeepSpeed save dir (latest + complete global_stepN/), "
        f"a consolidated dir ({CONSOLIDATED_WEIGHTS} + {LIME_CONFIG}) or a Hugging Face export ({HF_CONFIG})")
