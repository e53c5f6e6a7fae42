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

The --data-path blend, the split, blending and the index cache are the builder's
(megatron_lime/data/builder.py), shared with SFT datasets: the three index arrays are
cached as .npy next to the data (or in cache_path) under an MD5 of everything that
determines them (the data's content fingerprint, the split, seq_length, seed, sample
count, code version).

Semantics match Megatron-LM's GPTDataset (sample_index layout, token overlap between
consecutive samples, split rule); the shuffles use numpy's RandomState(seed) but are not
bit-identical to Megatron-LM's.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_lime.data.builder import INDEX_FORMAT_VERSION, SPLIT_NAMES, DatasetConfig, IndexCache, check_token_ids
from megatron_lime.native import compiled_helpers
from megatron_lime.data.indexed_dataset import IndexedDataset, IndexedDatasetError


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) array: (position in document_index, token offset) of each sample's start."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int64)
    if document_index.size < np.iinfo(np.int32).max:
        return compiled_helpers().build_sample_idx_int32(sizes, document_index, seq_length, num_samples)
    return compiled_helpers().build_sample_idx_int64(sizes, document_index, seq_length, num_samples)


def split_document_ranges(num_documents: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Document [begin, end) of each split, Megatron-LM's rounding rule (the last split absorbs the error)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


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
            raise IndexedDatasetError(f"{indexed.prefix}: documents [{begin}, {end}) have no tokens")
        self.num_epochs = self.epochs_needed(num_samples)
        description = {
            "class": "GPTDataset",
            "format_version": INDEX_FORMAT_VERSION,
            "prefix": os.path.abspath(indexed.prefix),
            "content_fingerprint": indexed.fingerprint(),
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
        """Fewest epochs whose token stream holds num_samples samples (each seq_length more tokens, +1 at the end)."""
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
        epoch_starts = [min(total_samples, -(-e * self.tokens_per_epoch // self.seq_length))
                        for e in range(self.num_epochs + 1)]
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


    # The builder's interface (megatron_lime/data/builder.py): --data-path, --split, blending.
    ZERO_SAMPLES_MEANS_ONE_EPOCH = False

    @classmethod
    def open(cls, prefix: str, config: DatasetConfig) -> IndexedDataset:
        indexed = IndexedDataset(prefix, vocab_size=config.vocab_size)
        if config.vocab_size is not None:
            check_token_ids(indexed, config.vocab_size, config.cache_dir_for(prefix))
        return indexed

    @classmethod
    def split(cls, indexed: IndexedDataset, fractions: list[float],
              config: DatasetConfig) -> list[tuple[int, int] | None]:
        """Contiguous document ranges (Megatron-LM's rule); None for a range without documents or tokens."""
        ranges = split_document_ranges(len(indexed), fractions)
        lengths = indexed.sequence_lengths
        return [(begin, end) if end > begin and int(np.asarray(lengths[begin:end]).sum(dtype=np.int64)) > 0
                else None for begin, end in ranges]

    @classmethod
    def build(cls, indexed: IndexedDataset, document_range: tuple[int, int], split_index: int, num_samples: int,
              config: DatasetConfig) -> "GPTDataset":
        return cls(indexed, document_range, config.seq_length, num_samples, config.seed,
                   config.cache_dir_for(indexed.prefix), SPLIT_NAMES[split_index])
