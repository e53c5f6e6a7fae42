"""GPT pretraining samples: packed, shuffled, split by document, blended by weight, cached.

A split of one dataset (a range of its documents) becomes a `GPTDataset`:

  document_index  the split's documents, shuffled, once per epoch (int64, epochs back to back)
  sample_index    (num_samples + 1, 2): where each sample of seq_length + 1 tokens starts in the
                  stream of documents in document_index order (C++: build_sample_idx)
  shuffle_index   the order samples are served in: a permutation within each epoch, so
                  epoch e is served completely before epoch e + 1

Sample k reads only the documents it spans (no state, no reading of samples 0..k-1), so
training resumes exactly at any step. Samples run across document boundaries; with
`preprocess_data.py --append-eod` an <eos> separates documents.

Several datasets (`--data-path 0.7 prefA 0.3 prefB`) become a `BlendedDataset` whose
dataset_index says which dataset serves blended sample k (C++: build_blending_indices;
after n samples each dataset has served within one sample of weight * n).

All index arrays are cached as .npy next to the data (or in cache_path) under an MD5 of
everything that determines them (the data's document lengths, the split, seq_length,
seed, sample count, code version): a second run loads them memory-mapped at once, and a
changed setting gets new files. Files are written under temporary names and renamed; with
torch.distributed, rank 0 builds and the other ranks wait at a barrier, then load.

Semantics match Megatron-LM's GPTDataset (sample_index layout, token overlap between
consecutive samples, split rule); the shuffles use numpy's RandomState(seed) but are not
bit-identical to Megatron-LM's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_lime.data.indexed_dataset import IndexedDataset, strip_extension

logger = logging.getLogger(__name__)

# Bump when the meaning of the cached arrays changes, so old caches are never reused.
INDEX_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")

_helpers = None


def data_helpers():
    """The compiled index builders (megatron_lime._data_helpers), with a clear message when missing."""
    global _helpers
    if _helpers is None:
        try:
            from megatron_lime import _data_helpers
        except ImportError as e:
            raise ImportError(
                "megatron_lime._data_helpers is not built; run "
                "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`) "
                f"in the megatron-lime checkout ({e})"
            ) from e
        _helpers = _data_helpers
    return _helpers


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) array: (position in document_index, token offset) of each sample's start."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int64)
    if document_index.size < np.iinfo(np.int32).max:
        return data_helpers().build_sample_idx_int32(sizes, document_index, seq_length, num_samples)
    return data_helpers().build_sample_idx_int64(sizes, document_index, seq_length, num_samples)


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16[size], dataset_sample_index int64[size]) realising `weights`."""
    return data_helpers().build_blending_indices(np.asarray(weights, dtype=np.float64), int(size))


def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '98/2/0', or '1') -> three fractions summing to 1."""
    parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers like 969,30,1")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Document [begin, end) of each split, Megatron-LM's rounding rule (the last split absorbs the error)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def parse_data_path(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """['prefix'] or ['0.7', 'prefA', '0.3', 'prefB'] -> [(weight, prefix), ...] (weights not yet normalised).

    Several prefixes without weights are weighted by their token counts.
    """
    items = [p for item in data_path for p in str(item).split()]
    if not items:
        raise ValueError("--data-path is empty")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) >= 2 and is_number(items[0]):
        if len(items) % 2:
            raise ValueError(f"--data-path {' '.join(items)}: expected weight/prefix pairs")
        pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        if any(w < 0 or not math.isfinite(w) for w, _ in pairs) or sum(w for w, _ in pairs) <= 0:
            raise ValueError(f"--data-path {' '.join(items)}: weights must be non-negative and not all zero")
        return pairs
    if any(is_number(s) and not os.path.exists(strip_extension(s) + ".idx") for s in items):
        raise ValueError(f"--data-path {' '.join(items)}: give a weight before every prefix, or none at all")
    return [(math.nan, p) for p in items]


# ---------------------------------------------------------------------------------------
# Cache: .npy arrays under a hash, written atomically, built by one rank.


def _distributed() -> tuple[bool, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return True, torch.distributed.get_rank()
    return False, 0


class IndexCache:
    """Named .npy arrays for one description; `load_or_build` makes them exactly once."""

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
        suffix = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        for name, array in arrays.items():
            tmp = self.path(name) + suffix
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, self.path(name))
        tmp = f"{self.stem}-description.json{suffix}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.description, f, indent=2, sort_keys=True)
        os.replace(tmp, f"{self.stem}-description.json")

    def load_or_build(self, names: Sequence[str], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Load the arrays if cached, else build (rank 0 only under torch.distributed) and save."""
        distributed, rank = _distributed()
        if self.stem is None:
            return build()
        if distributed and rank != 0:
            torch.distributed.barrier()  # rank 0 builds first
            if not self.complete(names):
                # Rank 0 could not write it (read-only directory) or the directory is not shared
                # between nodes: the build is deterministic, so build the same arrays here.
                logger.warning("rank %d: index cache %s-* not found after rank 0's build; building in memory "
                               "(use a --data-cache-path that all ranks share)", rank, self.stem)
                return build()
            return self.load(names)
        try:
            if self.complete(names):
                return self.load(names)
            start = time.perf_counter()
            arrays = build()
            try:
                self.save(arrays)
            except OSError as e:  # read-only data directory: keep the arrays in memory
                logger.warning("could not write the index cache to %s (%s); pass --data-cache-path", self.cache_dir, e)
                return arrays
            logger.info("built %s in %.2f s (cached under %s)", os.path.basename(self.stem), time.perf_counter() - start, self.cache_dir)
            return self.load(names)
        finally:
            if distributed:
                torch.distributed.barrier()


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


# ---------------------------------------------------------------------------------------


class GPTDataset(Dataset):
    """Packed samples of seq_length + 1 tokens over documents [begin, end) of one indexed dataset.

    Item k is {"input_ids": LongTensor[seq_length], "labels": LongTensor[seq_length],
    "loss_mask": FloatTensor[seq_length]} with input_ids = tokens[:-1], labels = tokens[1:].
    `len()` is at least num_samples (every sample of the epochs needed).
    """

    INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_length: int, num_samples: int,
                 seed: int, cache_dir: str | None, split_name: str = "train"):
        begin, end = document_range
        if not 0 <= begin < end <= len(indexed):
            raise ValueError(f"{indexed.prefix}: document range [{begin}, {end}) outside [0, {len(indexed)})")
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"seq_length ({seq_length}) and num_samples ({num_samples}) must be positive")
        self.indexed = indexed
        self.document_range = (begin, end)
        self.seq_length = seq_length
        self.seed = seed
        self.split_name = split_name
        sizes = np.asarray(indexed.sequence_lengths[begin:end])
        self.tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        if self.tokens_per_epoch < 1:
            raise ValueError(f"{indexed.prefix}: documents [{begin}, {end}) have no tokens")
        self.num_epochs = self.epochs_needed(num_samples)
        description = {
            "class": "GPTDataset",
            "format_version": INDEX_FORMAT_VERSION,
            "prefix": os.path.abspath(indexed.prefix),
            "document_lengths_md5": hashlib.md5(np.ascontiguousarray(sizes, dtype=np.int32).tobytes()).hexdigest(),
            "document_range": [begin, end],
            "seq_length": seq_length,
            "seed": seed,
            "num_samples": num_samples,
            "num_epochs": self.num_epochs,
            "split": split_name,
        }
        cache = IndexCache(cache_dir, f"GPTDataset-{split_name}", description)
        self.cache_key = cache.key
        arrays = cache.load_or_build(self.INDEX_NAMES, self._build_indices)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def epochs_needed(self, num_samples: int) -> int:
        """Fewest epochs whose token stream holds num_samples samples (each needs seq_length more tokens, +1 at the end)."""
        return max(1, math.ceil((num_samples * self.seq_length + 1) / self.tokens_per_epoch))

    def _build_indices(self) -> dict[str, np.ndarray]:
        begin, end = self.document_range
        rng = np.random.RandomState(self.seed)
        documents = np.arange(begin, end, dtype=np.int64)
        # One independent shuffle of the split's documents per epoch.
        document_index = np.concatenate([rng.permutation(documents) for _ in range(self.num_epochs)])
        total_samples = (self.num_epochs * self.tokens_per_epoch - 1) // self.seq_length
        sample_index = build_sample_index(self.indexed.sequence_lengths, document_index, self.seq_length, total_samples)
        # Shuffle within each epoch (a sample belongs to the epoch of its first token).
        epoch_starts = [min(total_samples, -(-e * self.tokens_per_epoch // self.seq_length)) for e in range(self.num_epochs + 1)]
        epoch_starts[-1] = total_samples
        index_dtype = np.int32 if total_samples < np.iinfo(np.int32).max else np.int64
        shuffle_index = np.concatenate([
            rng.permutation(np.arange(epoch_starts[e], epoch_starts[e + 1], dtype=index_dtype))
            for e in range(self.num_epochs)
        ])
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return int(self.shuffle_index.shape[0])

    def sample_tokens(self, k: int) -> np.ndarray:
        """The seq_length + 1 tokens of served sample k (int64)."""
        i = int(self.shuffle_index[k])
        first_doc, first_offset = (int(v) for v in self.sample_index[i])
        last_doc, last_offset = (int(v) for v in self.sample_index[i + 1])
        if first_doc == last_doc:
            tokens = self.indexed.get(int(self.document_index[first_doc]), first_offset, last_offset - first_offset + 1)
            return tokens.astype(np.int64)
        parts = [self.indexed.get(int(self.document_index[first_doc]), first_offset)]
        for j in range(first_doc + 1, last_doc):
            parts.append(self.indexed.get(int(self.document_index[j])))
        parts.append(self.indexed.get(int(self.document_index[last_doc]), 0, last_offset + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} out of range for {len(self)} samples")
        tokens = torch.from_numpy(self.sample_tokens(k))
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
        }


class BlendedDataset(Dataset):
    """Samples drawn from several datasets in proportion to weights (deterministic order)."""

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], size: int, cache_dir: str | None,
                 description: dict):
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
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


def build_pretraining_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                               num_samples: tuple[int, int, int], cache_path: str | None = None,
                               eod_id: int | None = None, vocab_size: int | None = None,
                               ) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, valid, test) datasets for Megatron-style --data-path / --split; a split with no samples wanted or no documents is None.

    Args:
        data_path: ["prefix"] or ["0.7", "prefA", "0.3", "prefB"] (prefixes of .bin/.idx pairs).
        split: document split like "969,30,1", applied to every dataset.
        seq_length: tokens per training sequence (samples hold seq_length + 1).
        seed: seeds the document and sample shuffles.
        num_samples: samples wanted for (train, valid, test); each dataset has at least as many.
        cache_path: where index arrays are cached (default: `index-cache/` next to each dataset).
        eod_id: not needed: the end-of-document token is already in the .bin (preprocess_data.py --append-eod);
            accepted for Megatron-LM parity and checked to fit the token dtype when given.
        vocab_size: when given, each dataset's token dtype is checked against it.
    """
    pairs = parse_data_path(data_path)
    fractions = parse_split(split)
    indexed = [IndexedDataset(prefix, vocab_size=vocab_size) for _, prefix in pairs]
    for ds in indexed:
        if eod_id is not None and np.issubdtype(ds.dtype, np.integer) and eod_id > np.iinfo(ds.dtype).max:
            raise ValueError(f"{ds.bin_path}: eod_id {eod_id} does not fit its token dtype {np.dtype(ds.dtype)}")
    weights = [w if not math.isnan(w) else float(ds.num_tokens) for (w, _), ds in zip(pairs, indexed)]
    ranges = [split_document_ranges(len(ds), fractions) for ds in indexed]

    def cache_dir_for(prefix: str) -> str:
        return cache_path if cache_path is not None else default_cache_dir(prefix)

    def tokens_in(d: int, begin: int, end: int) -> int:
        return int(np.asarray(indexed[d].sequence_lengths[begin:end]).sum(dtype=np.int64))

    results: list[Dataset | None] = []
    for split_id, wanted in enumerate(num_samples):
        name = SPLIT_NAMES[split_id]
        usable = [d for d in range(len(indexed))
                  if weights[d] > 0 and ranges[d][split_id][1] > ranges[d][split_id][0]
                  and tokens_in(d, *ranges[d][split_id]) > 0]
        if wanted <= 0 or not usable:
            results.append(None)
            continue
        if len(indexed) == 1:
            results.append(GPTDataset(indexed[0], ranges[0][split_id], seq_length, int(wanted), seed,
                                      cache_dir_for(indexed[0].prefix), name))
            continue
        blend_weights = [weights[d] for d in usable]
        # The blending order does not depend on the datasets, so each is built with exactly its share.
        dataset_index, _ = build_blending_indices(np.asarray(blend_weights) / sum(blend_weights), int(wanted))
        counts = np.bincount(dataset_index, minlength=len(usable))
        components = [
            GPTDataset(indexed[d], ranges[d][split_id], seq_length, max(1, int(count)), seed,
                       cache_dir_for(indexed[d].prefix), name)
            for d, count in zip(usable, counts)
        ]
        description = {
            "split": name, "seq_length": seq_length, "seed": seed,
            "components": [c.cache_key for c in components],
        }
        results.append(BlendedDataset(components, blend_weights, int(wanted),
                                      cache_dir_for(indexed[usable[0]].prefix), description))
    return results[0], results[1], results[2]
