"""The SFT mixture file (YAML): which datasets, where they are, how much of each.

    seed: 1234                 # sampling (caps, fractional weights) and the output shuffle
    seq_length: 512            # training sequence length; an example may have seq_length + 1 tokens
    over_length: truncate      # or drop (see template.render)
    data_root: /data/sft       # optional; relative dataset paths resolve against it
    datasets:
      - name: databricks/databricks-dolly-15k   # the adapter, by hub name
        path: databricks-dolly-15k.jsonl        # file, directory, glob, or datasets' save_to_disk dir
        split: train                            # picks files / the DatasetDict split (default: train)
        max_examples: 15000                     # cap: a seeded random subset of the rows' examples
        weight: 1.0                             # copies written per kept example (0.5: a random half)
        options: {}                             # adapter options, e.g. {languages: [en]}

Relative paths resolve against `data_root` when given (itself relative to the YAML file),
otherwise against the directory of the YAML file. `$VARS` and `~` are expanded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_lime.data.sft.adapters import get_adapter
from megatron_lime.data.sft.template import OVER_LENGTH_POLICIES
from megatron_lime.errors import LimeInputError


class MixtureError(LimeInputError):
    """A mixture file that is wrong; the message names the file and the entry."""


@dataclass(kw_only=True)
class MixtureEntry:
    """One dataset of the mixture."""

    name: str  # hub name of the adapter
    path: str  # file, directory or glob (resolved to an absolute path by load_mixture)
    split: str | None = "train"
    max_examples: int | None = None
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Mixture:
    """The whole mixture file."""

    datasets: list[MixtureEntry]
    seed: int = 1234
    seq_length: int = 512
    over_length: str = "truncate"
    data_root: str | None = None
    source: str = "<memory>"  # the YAML file it came from, for messages


def _check_keys(values: dict, cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - {"source"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MixtureError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")


def mixture_from_dict(values: Any, source: str = "<memory>", data_root: str | None = None) -> Mixture:
    """Validate a parsed mixture; relative paths resolve against data_root (or the file's directory)."""
    if not isinstance(values, dict):
        raise MixtureError(f"{source}: the mixture must be a mapping with a 'datasets' list")
    _check_keys(values, Mixture, source)
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    expand = lambda p: os.path.expanduser(os.path.expandvars(str(p)))  # noqa: E731
    if data_root is not None:  # from the command line: relative to the working directory
        root = os.path.abspath(expand(data_root))
    elif values.get("data_root") is not None:  # from the file: relative to the file
        root = os.path.join(base_dir, expand(values["data_root"]))
    else:
        root = None
    entries_raw = values.get("datasets")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise MixtureError(f"{source}: 'datasets' must be a non-empty list")
    entries = []
    for i, raw in enumerate(entries_raw):
        where = f"{source}: datasets[{i}]"
        if not isinstance(raw, dict):
            raise MixtureError(f"{where}: each dataset must be a mapping with at least 'name' and 'path'")
        _check_keys(raw, MixtureEntry, where)
        for required in ("name", "path"):
            if not raw.get(required):
                raise MixtureError(f"{where}: '{required}' is required")
        where = f"{source}: datasets[{i}] ({raw['name']})"
        if not isinstance(raw.get("options") or {}, dict):
            raise MixtureError(f"{where}: options must be a mapping, got {raw['options']!r}")
        if raw.get("split") is not None and not isinstance(raw["split"], str):
            raise MixtureError(f"{where}: split must be a name like 'train', got {raw['split']!r}")
        if not isinstance(raw.get("weight", 1.0), (int, float)) or isinstance(raw.get("weight"), bool):
            raise MixtureError(f"{where}: weight must be a number, got {raw['weight']!r}")
        path = expand(raw["path"])
        if not os.path.isabs(path):
            path = os.path.join(root or base_dir, path)
        entry = MixtureEntry(name=str(raw["name"]), path=os.path.normpath(path) if "*" not in path else path,
                             split=raw.get("split", "train"), max_examples=raw.get("max_examples"),
                             weight=float(raw.get("weight", 1.0)), options=dict(raw.get("options") or {}))
        if entry.max_examples is not None and (type(entry.max_examples) is not int or entry.max_examples <= 0):
            raise MixtureError(f"{where}: max_examples must be a positive integer, got {entry.max_examples!r}")
        if entry.weight <= 0:
            raise MixtureError(f"{where}: weight must be positive, got {entry.weight}")
        try:
            get_adapter(entry.name, entry.options)
        except ValueError as e:
            raise MixtureError(f"{where}: {e}") from None
        entries.append(entry)
    for key in ("seed", "seq_length"):
        if key in values and type(values[key]) is not int:
            raise MixtureError(f"{source}: {key} must be an integer, got {values[key]!r}")
    mixture = Mixture(datasets=entries, seed=int(values.get("seed", 1234)),
                      seq_length=int(values.get("seq_length", 512)),
                      over_length=str(values.get("over_length", "truncate")), data_root=root, source=source)
    if mixture.over_length not in OVER_LENGTH_POLICIES:
        raise MixtureError(f"{source}: over_length must be one of {', '.join(OVER_LENGTH_POLICIES)}, "
                           f"got {mixture.over_length!r}")
    if mixture.seq_length <= 0:
        raise MixtureError(f"{source}: seq_length must be positive, got {mixture.seq_length}")
    return mixture


def load_mixture(path: str, data_root: str | None = None) -> Mixture:
    """Read and validate a mixture YAML file."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise MixtureError(f"{path}: cannot read the mixture file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise MixtureError(f"{path}: invalid YAML: {e}") from None
    return mixture_from_dict(values, source=path, data_root=data_root)
