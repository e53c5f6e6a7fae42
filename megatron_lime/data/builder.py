"""One builder for every dataset the trainer reads (GPT pretraining, SFT), as Megatron-core's
BlendedMegatronDatasetBuilder: one split parser, one blend parser, one index cache, one C++ blend.

    train, valid, test = build_datasets(GPTDataset, DatasetConfig(data_path=["0.7", "A", "0.3", "B"],
                                        split="969,30,1", seq_length=2048, seed=1234,
                                        num_samples=(n_train, n_valid, n_test)))

A dataset type is a class with three classmethods (see `BuildableDataset`): `open` a prefix
(validated; token ids checked against the vocabulary), `split` it into train/valid/test
selections, `build` one split of `num_samples` samples with its indices in the `IndexCache`.
The builder does the rest identically for every type:

  --data-path  `PREFIX`, `A B` (weighted by their token counts), `W1 A W2 B`, or one file that
               lists any of these (whitespace-separated, `#` starts a comment): `parse_data_path`
  --split      "969,30,1" / "98/2" / "1": `parse_split`
  blending     several prefixes become a `BlendedDataset`; which dataset serves blended sample k
               comes from the C++ helper (megatron_lime._data_helpers.build_blending_indices),
               and each component is built with exactly the samples the blend takes from it
  cache        `IndexCache`: .npy arrays under an MD5 of the settings and of the data's content
               fingerprint (IndexedDataset.fingerprint), written atomically; under
               torch.distributed, global rank 0 builds, then the first rank of every other node
               (in case its cache directory is not shared), and everyone else waits at a barrier
               and loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_lime.native import compiled_helpers
from megatron_lime.data.indexed_dataset import IndexedDataset, strip_extension
from megatron_lime.errors import LimeInputError
from megatron_lime.files import atomic_write, write_json

logger = logging.getLogger(__name__)

# Bump when the meaning of the cached arrays changes, so old caches are never reused.
INDEX_FORMAT_VERSION = 2
SPLIT_NAMES = ("train", "valid", "test")

def normalise(weights: Sequence[float]) -> list[float]:
    """Weights as fractions; the builder and BlendedDataset use this one function, so their blends agree exactly."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[size], dataset_sample_index int64[size]) realising `weights` (C++).

    Greedy: each sample goes to the dataset furthest below its share so far, so after n samples
    every dataset has served within one sample of weight * n, and dataset d's samples are
    taken in order 0, 1, 2, ...
    """
    return compiled_helpers().build_blending_indices(np.asarray(weights, dtype=np.float64), int(size))


# ---------------------------------------------------------------------------------------
# The two parsers.


def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '98/2/0', or '1') -> three fractions summing to 1."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise LimeInputError(f"--split {split!r}: split must be up to three non-negative weights like 969,30,1")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_dataset_prefix(item: str) -> bool:
    return os.path.isfile(strip_extension(item) + ".idx")


def read_data_path_file(path: str) -> list[str]:
    """The items of a file that lists a blend (whitespace-separated; `#` starts a comment)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LimeInputError(f"--data-path {path}: cannot read the blend file ({e})") from None
    items = [item for line in lines for item in line.split("#", 1)[0].split()]
    if not items:
        raise LimeInputError(f"--data-path {path}: the blend file lists no datasets")
    return items


def parse_data_path(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """--data-path -> [(weight, prefix), ...], weights not yet normalised; NaN = weight by token count.

    Forms: ['PREFIX'], ['A', 'B'] (weighted by their token counts), ['0.7', 'A', '0.3', 'B'] (also
    as one string '0.7 A 0.3 B'), or ['blend.txt']: one existing file that is not a dataset and
    lists any of the other forms.
    """
    items = [p for item in data_path for p in str(item).split()]
    if not items:
        raise LimeInputError("--data-path is empty")
    if len(items) == 1 and os.path.isfile(items[0]) and not _is_dataset_prefix(items[0]) \
            and not items[0].endswith((".bin", ".idx")):
        items = read_data_path_file(items[0])
    if len(items) >= 2 and _is_number(items[0]):
        if len(items) % 2:
            raise LimeInputError(f"--data-path {' '.join(items)}: expected weight/prefix pairs")
        if not all(_is_number(w) for w in items[0::2]):
            raise LimeInputError(f"--data-path {' '.join(items)}: expected weight/prefix pairs")
        pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        if any(w < 0 or not math.isfinite(w) for w, _ in pairs) or sum(w for w, _ in pairs) <= 0:
            raise LimeInputError(f"--data-path {' '.join(items)}: weights must be non-negative and not all zero")
        return pairs
    if any(_is_number(s) and not _is_dataset_prefix(s) for s in items):
        raise LimeInputError(f"--data-path {' '.join(items)}: give a weight before every prefix, or none at all")
    return [(math.nan, p) for p in items]


# ---------------------------------------------------------------------------------------
# The cache: .npy arrays under a hash, written atomically, built once per node.


def _ranks() -> tuple[bool, int, int]:
    """(distributed, global rank, rank within its node). LOCAL_RANK is set by every launcher we use."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        return True, rank, int(os.environ.get("LOCAL_RANK", rank))
    return False, 0, 0


class IndexCache:
    """Named .npy arrays for one description (settings + content fingerprints); `load_or_build` makes them once."""

    def __init__(self, cache_dir: str | None, kind: str, description: dict):
        self.description = description
        text = json.dumps(description, sort_keys=True)
        self.key = hashlib.md5(text.encode("utf-8")).hexdigest()
        self.cache_dir = cache_dir
        self.stem = os.path.join(cache_dir, f"{self.key}-{kind}") if cache_dir else None

    def path(self, name: str) -> str:
        return f"{self.stem}-{name}.npy"

    def complete(self, names: Sequence[str]) -> bool:
        # The description is written last: its presence means every array is in place.
        return self.stem is not None and os.path.isfile(f"{self.stem}-description.json") and all(
            os.path.isfile(self.path(n)) for n in names)

    def load(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: np.load(self.path(n), mmap_mode="r", allow_pickle=False) for n in names}

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        for name, array in arrays.items():
            with atomic_write(self.path(name), "wb") as f:
                np.save(f, array, allow_pickle=False)
        write_json(f"{self.stem}-description.json", self.description)

    def _load_or_build_here(self, names: Sequence[str],
                            build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.complete(names):
            return self.load(names)
        start = time.perf_counter()
        arrays = build()
        try:
            self.save(arrays)
        except OSError as e:  # read-only data directory: keep the arrays in memory
            logger.warning("could not write the index cache to %s (%s); pass --data-cache-path", self.cache_dir, e)
            return arrays
        logger.info("built %s in %.2f s (cached under %s)", os.path.basename(self.stem), time.perf_counter() - start,
                    self.cache_dir)
        return self.load(names)

    def load_or_build(self, names: Sequence[str], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Load the arrays if cached, else build and save them; under torch.distributed, once per node.

        Phase 1: global rank 0 loads or builds. Phase 2: the first rank of every other node does
        the same (it finds rank 0's files when the directory is shared). Then every other rank
        loads. Every rank passes both barriers even when a build fails, so a failure never
        leaves the others waiting; they then find no cache and fail the same way on their own.
        """
        if self.stem is None:
            return build()
        distributed, rank, local_rank = _ranks()
        if not distributed:
            return self._load_or_build_here(names, build)
        arrays: dict[str, np.ndarray] | None = None
        error: BaseException | None = None
        for builds_now in (rank == 0, rank != 0 and local_rank == 0):
            if builds_now and error is None:
                try:
                    arrays = self._load_or_build_here(names, build)
                except Exception as e:  # re-raised after the barriers
                    error = e
            torch.distributed.barrier()
        if error is not None:
            raise error
        if arrays is not None:
            return arrays
        if not self.complete(names):
            # The node's first rank could not write it (read-only directory): the build is
            # deterministic, so build the same arrays here.
            logger.warning("rank %d: index cache %s-* not found after its node's build; building in memory "
                           "(use a --data-cache-path that the ranks of a node share)", rank, self.stem)
            return build()
        return self.load(names)


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def check_token_ids(indexed: IndexedDataset, vocab_size: int, cache_dir: str | None) -> None:
    """Raise IndexedDatasetError (naming the file and the first bad id) if a token id is outside [0, vocab_size).

    The smallest and largest ids come from one vectorised pass over the .bin (np.min/np.max over
    64 MiB chunks read into one buffer, IndexedDataset.token_range; see data/README.md), cached under
    the data's content fingerprint like the other index arrays, so a 20B-token corpus is read
    once per node and version of the data, not at every start.
    """
    cache = IndexCache(cache_dir, "TokenRange", {"class": "TokenRange", "format_version": INDEX_FORMAT_VERSION,
                                                  "prefix": os.path.abspath(indexed.prefix),
                                                  "content_fingerprint": indexed.fingerprint()})
    token_range = cache.load_or_build(("min_max",),
                                      lambda: {"min_max": np.array(indexed.token_range(), dtype=np.int64)})
    smallest, largest = (int(v) for v in token_range["min_max"])
    if smallest < 0 or largest >= vocab_size:
        indexed.check_token_ids(vocab_size)


# ---------------------------------------------------------------------------------------
# Blending.


class BlendedDataset(Dataset):
    """Samples drawn from several datasets in proportion to weights (deterministic order, C++ helper)."""

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], size: int, cache_dir: str | None,
                 description: dict):
        self.datasets = list(datasets)
        self.weights = normalise(weights)
        cache = IndexCache(cache_dir, "BlendedDataset", {**description, "class": "BlendedDataset",
                                                          "format_version": INDEX_FORMAT_VERSION, "size": size,
                                                          "weights": self.weights})
        self.cache_key = cache.key

        def build() -> dict[str, np.ndarray]:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, size)
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        arrays = cache.load_or_build(("dataset_index", "dataset_sample_index"), build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (dataset, count) in enumerate(zip(self.datasets, counts)):
            if count > len(dataset):
                raise ValueError(f"blended dataset {d} must serve {count} samples but has {len(dataset)}")

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[k])][int(self.dataset_sample_index[k])]


# ---------------------------------------------------------------------------------------
# The builder.


@dataclass(kw_only=True)
class DatasetConfig:
    """What every dataset type is built from (a type's own settings go in `options`)."""

    data_path: Sequence[str]  # see parse_data_path
    split: str  # see parse_split
    seq_length: int  # tokens (positions) per training sequence
    seed: int  # seeds every shuffle
    num_samples: tuple[int, int, int]  # samples wanted for train / valid / test
    cache_path: str | None = None  # where index arrays are cached (default: index-cache/ beside each dataset)
    vocab_size: int | None = None  # when given, every token id is checked to be below it
    options: Any = None  # the dataset type's own settings (SFTDataset: sft.dataset.SFTOptions)

    def cache_dir_for(self, prefix: str) -> str:
        return self.cache_path if self.cache_path is not None else default_cache_dir(prefix)


class BuildableDataset(Protocol):
    """What a dataset type gives the builder (GPTDataset, SFTDataset)."""

    # What num_samples <= 0 asks for: no dataset (None), or one epoch of the split.
    ZERO_SAMPLES_MEANS_ONE_EPOCH: ClassVar[bool]
    cache_key: str

    @classmethod
    def open(cls, prefix: str, config: DatasetConfig) -> Any:
        """The validated source (it has `num_tokens`) of one prefix."""

    @classmethod
    def split(cls, source: Any, fractions: list[float], config: DatasetConfig) -> list[Any | None]:
        """The train / valid / test selections of a source; None where a split is empty."""

    @classmethod
    def build(cls, source: Any, selection: Any, split_index: int, num_samples: int,
              config: DatasetConfig) -> Dataset:
        """One split of at least num_samples samples (num_samples <= 0: one epoch)."""

    def __len__(self) -> int: ...


def build_datasets(dataset_type: type[BuildableDataset], config: DatasetConfig
                   ) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, valid, test) of `dataset_type` for config's blend and split; None for a split with nothing in it."""
    pairs = parse_data_path(config.data_path)
    fractions = parse_split(config.split)
    sources = [dataset_type.open(prefix, config) for _, prefix in pairs]
    weights = [w if not math.isnan(w) else float(src.num_tokens) for (w, _), src in zip(pairs, sources)]
    selections = [dataset_type.split(src, fractions, config) for src in sources]
    results: list[Dataset | None] = []
    for split_index, name in enumerate(SPLIT_NAMES):
        wanted = int(config.num_samples[split_index])
        usable = [d for d in range(len(sources)) if weights[d] > 0 and selections[d][split_index] is not None]
        if not usable or (wanted <= 0 and not dataset_type.ZERO_SAMPLES_MEANS_ONE_EPOCH):
            results.append(None)
            continue

        def component(d: int, samples: int) -> Dataset:
            return dataset_type.build(sources[d], selections[d][split_index], split_index, samples, config)

        if len(sources) == 1:
            results.append(component(0, wanted))
            continue
        blend_weights = normalise([weights[d] for d in usable])
        if wanted > 0:
            size = wanted
            # The blending order does not depend on the datasets, so each is built with exactly its share.
            counts = np.bincount(build_blending_indices(blend_weights, size)[0], minlength=len(usable))
            components = [component(d, max(1, int(count))) for d, count in zip(usable, counts)]
        else:  # one epoch of every component, blended by weight; a component that runs short gets more epochs
            components = [component(d, 0) for d in usable]
            size = sum(len(c) for c in components)
            counts = np.bincount(build_blending_indices(blend_weights, size)[0], minlength=len(usable))
            components = [c if len(c) >= count else component(d, int(count))
                          for d, c, count in zip(usable, components, counts)]
        description = {"split": name, "components": [c.cache_key for c in components]}
        results.append(BlendedDataset(components, blend_weights, size,
                                      config.cache_dir_for(pairs[usable[0]][1]), description))
    logger.info("%s: %s", dataset_type.__name__, ", ".join(f"{n}={len(d) if d is not None else 0}"
                                                            for n, d in zip(SPLIT_NAMES, results)))
    return results[0], results[1], results[2]
