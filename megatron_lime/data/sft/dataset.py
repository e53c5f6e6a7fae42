"""SFT datasets for the training loop: packed (or padded) sequences of whole examples.

    train, valid, test = build_datasets(SFTDataset, DatasetConfig(
        data_path=["data/sft/lime_sft_text_document"], split="969,30,1", seq_length=512, seed=1234,
        num_samples=(n_train, n_valid, n_test), options=SFTOptions(eod_id=tokenizer.eos_id)))

Item k is a dict of (seq_length,) tensors:
  input_ids     LongTensor   the examples' tokens back to back, then pad_id
  labels        LongTensor   next token where it is a trained target, else -100
  loss_mask     FloatTensor  1.0 at trained targets (responses and their <eos>), else 0.0
  position_ids  LongTensor   0, 1, 2, ... restarting at every example (and for the padding)
  document_ids  LongTensor   0 for the first example, 1 for the next, ...; the padding has its own id

An example of n tokens takes n - 1 positions (its final <eos> is a target, never an input),
is never split across sequences, and attends only to itself when the model is given
document_ids. Packing is best-fit over a window of open sequences, in a seeded random order
that changes every epoch; `SFTOptions(packed=False)` puts one example in each padded sequence.
The train/valid/test split is a seeded permutation of each dataset's examples, cut by the
split weights, so every split draws from the whole mixture. The --data-path blend (`PREFIX`,
`A B`, `W1 A W2 B`, a file listing them), blending and the cache of sequence plans are the
builder's (megatron_lime/data/builder.py), the same as for pretraining.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_lime.data.builder import (INDEX_FORMAT_VERSION, SPLIT_NAMES, DatasetConfig, IndexCache,
                                        check_token_ids, parse_split)
from megatron_lime.data.indexed_dataset import IndexedDataset
from megatron_lime.data.sft.preprocess import SFTDataError, loss_mask_prefix_for

OPEN_SEQUENCES = 256  # best-fit window: sequences still being filled


@dataclass(frozen=True, kw_only=True)
class SFTOptions:
    """SFTDataset's own settings, passed to the builder as DatasetConfig.options (the trainer fills them in)."""

    eod_id: int | None = None  # when given, every example must end with it (catches data made with another tokenizer)
    packed: bool = True  # best-fit packing of whole examples; False: one example per padded sequence
    pad_id: int = 0  # fills the rest of a sequence


def sft_options(config: DatasetConfig) -> SFTOptions:
    if config.options is None:
        return SFTOptions()
    if not isinstance(config.options, SFTOptions):
        raise TypeError(f"SFTDataset takes DatasetConfig.options=SFTOptions(...), not {type(config.options).__name__}")
    return config.options


class SFTExampleSource:
    """The text / loss-mask pair written by tools/preprocess_sft_data.py, checked to belong together."""

    def __init__(self, text_prefix: str, eod_id: int | None = None, vocab_size: int | None = None,
                 cache_dir: str | None = None):
        self.text_prefix = text_prefix
        self.mask_prefix = loss_mask_prefix_for(text_prefix)
        self.tokens = IndexedDataset(text_prefix, vocab_size=vocab_size)
        self.loss_masks = IndexedDataset(self.mask_prefix)
        if self.loss_masks.dtype != np.uint8:
            raise SFTDataError(f"{self.mask_prefix}: loss masks must be uint8, got {np.dtype(self.loss_masks.dtype)}")
        if vocab_size is not None:
            check_token_ids(self.tokens, vocab_size, cache_dir)
        if self.loss_masks.max_token_id() > 1:
            raise SFTDataError(f"{self.loss_masks.bin_path}: loss mask values must be 0 or 1, found "
                                  f"{self.loss_masks.max_token_id()}: corrupt or not a loss mask")
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_masks.sequence_lengths):
            raise SFTDataError(f"{text_prefix} and {self.mask_prefix} do not describe the same examples "
                                  f"({len(self.tokens)} vs {len(self.loss_masks)} sequences, or different lengths)")
        if len(self.tokens) == 0:
            raise SFTDataError(f"{text_prefix}: no examples")
        self.lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if eod_id is not None:
            last = np.array([self.tokens.get(i, offset=int(n) - 1)[0] if n else -1
                             for i, n in enumerate(self.lengths)])  # (n_examples,) last token of each
            wrong = np.flatnonzero(last != eod_id)
            if wrong.size:
                raise SFTDataError(f"{text_prefix}: {wrong.size} example(s) (first: #{wrong[0]}) do not end with "
                                      f"eod id {eod_id}: made with another tokenizer?")

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss_mask) of example i, both (n,)."""
        return self.tokens[i], self.loss_masks[i]

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def fingerprint(self) -> str:
        """Content fingerprint of the text and loss-mask pairs (IndexedDataset.fingerprint)."""
        return f"{self.tokens.fingerprint()}:{self.loss_masks.fingerprint()}"


def split_example_ids(num_examples: int, split: str | list[float], seed: int) -> list[np.ndarray]:
    """Example ids of train / valid / test: a seeded permutation cut at the split fractions."""
    fractions = parse_split(split) if isinstance(split, str) else split
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_examples)))
    bounds[-1] = num_examples  # rounding never loses or invents an example
    permutation = np.random.default_rng([seed, 0x5F7]).permutation(num_examples)
    return [np.sort(permutation[bounds[i]:bounds[i + 1]]) for i in range(3)]


def pack_best_fit(positions: np.ndarray, seq_length: int, open_limit: int = OPEN_SEQUENCES) -> list[list[int]]:
    """Group items (given in the order to pack them) into sequences of at most seq_length positions.

    Each item goes into the open sequence with the least room that still fits it (best fit);
    when more than `open_limit` sequences are open the fullest is closed. Returns the item
    indices of each sequence. Items are never split.
    """
    open_rooms: list[tuple[int, int]] = []  # sorted (room left, sequence index)
    sequences: list[list[int]] = []
    closed: list[int] = []
    for item, size in enumerate(positions.tolist()):
        where = bisect.bisect_left(open_rooms, (size, -1))
        if where < len(open_rooms):
            room, seq = open_rooms.pop(where)
            sequences[seq].append(item)
            room -= size
        else:
            seq, room = len(sequences), seq_length - size
            sequences.append([item])
        if room > 0:
            bisect.insort(open_rooms, (room, seq))
        else:
            closed.append(seq)
        if len(open_rooms) > open_limit:
            closed.append(open_rooms.pop(0)[1])
    closed.extend(seq for _, seq in open_rooms)
    return [sequences[s] for s in closed]


@dataclass
class SequencePlan:
    """Which examples make each sequence: sequence k is examples[starts[k]:starts[k + 1]]."""

    examples: np.ndarray  # (total examples placed,) int64
    starts: np.ndarray  # (num_sequences + 1,) int64

    def __len__(self) -> int:
        return len(self.starts) - 1


def plan_sequences(positions: np.ndarray, example_ids: np.ndarray, seq_length: int, seed: int,
                   num_samples: int, packed: bool) -> SequencePlan:
    """Epochs of packed (or one-per-sequence) examples until there are at least num_samples sequences."""
    chunks: list[list[int]] = []
    epoch = 0
    while epoch == 0 or len(chunks) < num_samples:
        rng = np.random.default_rng([seed, epoch])
        order = example_ids[rng.permutation(len(example_ids))]
        if packed:
            groups = pack_best_fit(positions[order], seq_length)
            epoch_chunks = [order[g].tolist() for g in groups]
            # Best fit closes short sequences last; shuffle so sizes do not trend within the epoch.
            epoch_chunks = [epoch_chunks[i] for i in rng.permutation(len(epoch_chunks))]
        else:
            epoch_chunks = [[int(i)] for i in order]
        chunks.extend(epoch_chunks)
        epoch += 1
    starts = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=starts[1:])
    examples = np.fromiter((i for c in chunks for i in c), dtype=np.int64, count=int(starts[-1]))
    return SequencePlan(examples=examples, starts=starts)


class SFTDataset(Dataset):
    """Sequences of whole examples of one preprocessed SFT dataset (see the module docstring)."""

    def __init__(self, source: SFTExampleSource, example_ids: np.ndarray, seq_length: int, seed: int,
                 num_samples: int, packed: bool = True, pad_id: int = 0, cache_path: str | None = None,
                 name: str = "train"):
        self.source, self.seq_length, self.packed, self.pad_id, self.name = source, seq_length, packed, pad_id, name
        positions = source.lengths - 1  # (n_examples,) positions each example takes
        too_long = example_ids[positions[example_ids] > seq_length]
        if too_long.size:
            raise SFTDataError(
                f"{source.text_prefix}: {too_long.size} example(s) need more than seq_length={seq_length} positions "
                f"(example #{too_long[0]} has {source.lengths[too_long[0]]} tokens); preprocess with "
                f"tools/preprocess_sft_data.py --seq-length {seq_length}"
            )
        if np.any(positions[example_ids] < 1):
            raise SFTDataError(f"{source.text_prefix}: an example has fewer than 2 tokens")
        description = {
            "class": "SFTDataset", "format_version": INDEX_FORMAT_VERSION,
            "prefix": os.path.abspath(source.text_prefix), "content_fingerprint": source.fingerprint(),
            "split": name, "seq_length": seq_length, "seed": seed, "num_samples": num_samples, "packed": packed,
            "open_sequences": OPEN_SEQUENCES, "example_ids_sha1": hashlib.sha1(example_ids.tobytes()).hexdigest(),
        }
        cache = IndexCache(cache_path, f"SFTDataset-{name}", description)
        self.cache_key = cache.key

        def build() -> dict[str, np.ndarray]:
            plan = plan_sequences(positions, example_ids, seq_length, seed, num_samples, packed)
            return {"examples": plan.examples, "starts": plan.starts}

        arrays = cache.load_or_build(("examples", "starts"), build)
        self.plan = SequencePlan(examples=arrays["examples"], starts=arrays["starts"])

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < len(self.plan):
            raise IndexError(f"sample {k} out of range for {len(self.plan)} {self.name} sequences")
        s = self.seq_length
        input_ids = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, -100, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        document_ids = np.zeros(s, dtype=np.int64)
        cursor = 0
        example_ids = self.plan.examples[self.plan.starts[k]:self.plan.starts[k + 1]]
        for document, example in enumerate(example_ids.tolist()):
            tokens, mask = self.source.example(example)  # (n,), (n,)
            tokens = tokens.astype(np.int64)  # stored as uint16: -100 must not wrap around
            n = len(tokens) - 1  # positions: the last token is only a target
            span = slice(cursor, cursor + n)
            input_ids[span] = tokens[:-1]
            trained = mask[1:].astype(bool)  # (n,) is token t+1 a trained target?
            labels[span] = np.where(trained, tokens[1:], -100)
            loss_mask[span] = trained
            position_ids[span] = np.arange(n)
            document_ids[span] = document
            cursor += n
        # Padding is one more document, so it attends only to itself; its positions restart too.
        position_ids[cursor:] = np.arange(s - cursor)
        document_ids[cursor:] = len(example_ids)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
                "document_ids": torch.from_numpy(document_ids)}


    # The builder's interface (megatron_lime/data/builder.py): --data-path, --split, blending.
    ZERO_SAMPLES_MEANS_ONE_EPOCH = True

    @classmethod
    def open(cls, prefix: str, config: DatasetConfig) -> SFTExampleSource:
        return SFTExampleSource(prefix, sft_options(config).eod_id, config.vocab_size, config.cache_dir_for(prefix))

    @classmethod
    def split(cls, source: SFTExampleSource, fractions: list[float], config: DatasetConfig) -> list[np.ndarray | None]:
        """Seeded example ids of each split; None for a split without examples."""
        return [ids if len(ids) else None for ids in split_example_ids(len(source), fractions, config.seed)]

    @classmethod
    def build(cls, source: SFTExampleSource, example_ids: np.ndarray, split_index: int, num_samples: int,
              config: DatasetConfig) -> "SFTDataset":
        options = sft_options(config)
        return cls(source, example_ids, config.seq_length, config.seed + split_index, num_samples,
                   options.packed, options.pad_id, config.cache_dir_for(source.text_prefix), SPLIT_NAMES[split_index])
