"""SFT datasets for the training loop: packed (or padded) sequences of whole examples.

    train, valid, test = build_sft_datasets(["data/sft/lime_sft_text_document"], "969,30,1",
                                            seq_length=512, seed=1234, num_samples=(n_train, n_valid, n_test))

Item k is a dict of (seq_length,) tensors:
  input_ids     LongTensor   the examples' tokens back to back, then pad_id
  labels        LongTensor   next token where it is a trained target, else -100
  loss_mask     FloatTensor  1.0 at trained targets (responses and their <eos>), else 0.0
  position_ids  LongTensor   0, 1, 2, ... restarting at every example (and for the padding)
  document_ids  LongTensor   0 for the first example, 1 for the next, ...; the padding has its own id

An example of n tokens takes n - 1 positions (its final <eos> is a target, never an input),
is never split across sequences, and attends only to itself when the model is given
document_ids. Packing is best-fit over a window of open sequences, in a seeded random order
that changes every epoch; `packed=False` puts one example in each padded sequence.
The train/valid/test split is a seeded permutation of each dataset's examples, cut by the
split weights, so every split draws from the whole mixture.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_lime.data.indexed_dataset import IndexedDataset
from megatron_lime.data.sft.preprocess import loss_mask_prefix_for

logger = logging.getLogger(__name__)

OPEN_SEQUENCES = 256  # best-fit window: sequences still being filled
CACHE_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")


class SFTDatasetError(ValueError):
    """SFT data that cannot be used as asked (mismatched files, examples longer than the sequence)."""


class SFTExampleSource:
    """The text / loss-mask pair written by tools/preprocess_sft_data.py, checked to belong together."""

    def __init__(self, text_prefix: str, eod_id: int | None = None):
        self.text_prefix = text_prefix
        self.mask_prefix = loss_mask_prefix_for(text_prefix)
        self.tokens = IndexedDataset(text_prefix)
        self.loss_masks = IndexedDataset(self.mask_prefix)
        if self.loss_masks.dtype != np.uint8:
            raise SFTDatasetError(f"{self.mask_prefix}: loss masks must be uint8, got {np.dtype(self.loss_masks.dtype)}")
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_masks.sequence_lengths):
            raise SFTDatasetError(f"{text_prefix} and {self.mask_prefix} do not describe the same examples "
                                  f"({len(self.tokens)} vs {len(self.loss_masks)} sequences, or different lengths)")
        if len(self.tokens) == 0:
            raise SFTDatasetError(f"{text_prefix}: no examples")
        self.lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if eod_id is not None:
            last = np.array([self.tokens.get(i, offset=int(n) - 1)[0] if n else -1
                             for i, n in enumerate(self.lengths)])  # (n_examples,) last token of each
            wrong = np.flatnonzero(last != eod_id)
            if wrong.size:
                raise SFTDatasetError(f"{text_prefix}: {wrong.size} example(s) (first: #{wrong[0]}) do not end with "
                                      f"eod id {eod_id}: made with another tokenizer?")

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss_mask) of example i, both (n,)."""
        return self.tokens[i], self.loss_masks[i]

    def fingerprint(self) -> str:
        stats = [os.path.getsize(p) for p in (self.tokens.idx_path, self.tokens.bin_path, self.loss_masks.bin_path)]
        return f"{os.path.abspath(self.text_prefix)}:{stats}:{int(os.path.getmtime(self.tokens.idx_path))}"


def parse_split(split: str) -> list[float]:
    """Megatron's split string ("969,30,1" or "98/2/0") as three fractions summing to 1."""
    parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split must be up to three non-negative weights like '969,30,1', got {split!r}")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_example_ids(num_examples: int, split: str, seed: int) -> list[np.ndarray]:
    """Example ids of train / valid / test: a seeded permutation cut at the split fractions."""
    fractions = parse_split(split)
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
            raise SFTDatasetError(
                f"{source.text_prefix}: {too_long.size} example(s) need more than seq_length={seq_length} positions "
                f"(example #{too_long[0]} has {source.lengths[too_long[0]]} tokens); preprocess with "
                f"tools/preprocess_sft_data.py --seq-length {seq_length}"
            )
        if np.any(positions[example_ids] < 1):
            raise SFTDatasetError(f"{source.text_prefix}: an example has fewer than 2 tokens")
        self.plan = self._load_or_plan(positions, example_ids, seed, num_samples, cache_path)

    def _load_or_plan(self, positions: np.ndarray, example_ids: np.ndarray, seed: int, num_samples: int,
                      cache_path: str | None) -> SequencePlan:
        if cache_path is None:
            return plan_sequences(positions, example_ids, self.seq_length, seed, num_samples, self.packed)
        key = json.dumps([CACHE_VERSION, self.source.fingerprint(), self.name, self.seq_length, seed, num_samples,
                          self.packed, OPEN_SEQUENCES, hashlib.sha1(example_ids.tobytes()).hexdigest()])
        file = os.path.join(cache_path, f"sft_{self.name}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
        if os.path.isfile(file):
            with np.load(file) as cached:
                return SequencePlan(examples=cached["examples"], starts=cached["starts"])
        plan = plan_sequences(positions, example_ids, self.seq_length, seed, num_samples, self.packed)
        os.makedirs(cache_path, exist_ok=True)
        tmp = f"{file}.tmp-{os.getpid()}.npz"
        np.savez(tmp, examples=plan.examples, starts=plan.starts)
        os.replace(tmp, file)  # atomic: ranks racing to write the same plan are harmless
        return plan

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


def blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blending: sample i comes from the dataset furthest behind its weight's share.

    Returns (dataset index, sample index within that dataset), both (size,).
    """
    weights_array = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int64)
    sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        choice = int(np.argmax(weights_array * (i + 1) - counts))
        dataset_index[i], sample_index[i] = choice, counts[choice]
        counts[choice] += 1
    return dataset_index, sample_index


class BlendedSFTDataset(Dataset):
    """Several SFT datasets mixed by weight (Megatron's `--data-path w1 p1 w2 p2`)."""

    def __init__(self, datasets: list[SFTDataset], weights: list[float], size: int):
        self.datasets = datasets
        self.dataset_index, self.sample_index = blend_indices(weights, size)
        for d, dataset in enumerate(datasets):
            needed = int(self.sample_index[self.dataset_index == d].max(initial=-1)) + 1
            if needed > len(dataset):
                raise SFTDatasetError(f"blend needs {needed} sequences of {dataset.source.text_prefix} "
                                      f"but it has {len(dataset)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.datasets[self.dataset_index[k]][int(self.sample_index[k])]


def parse_data_path(data_path: list[str]) -> tuple[list[float], list[str]]:
    """["prefix"] or ["w1", "prefix1", "w2", "prefix2", ...] -> (normalised weights, prefixes)."""
    if len(data_path) == 1:
        return [1.0], list(data_path)
    if len(data_path) % 2:
        raise ValueError(f"data_path must be one prefix or weight/prefix pairs, got {data_path}")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ValueError(f"data_path must be one prefix or weight/prefix pairs, got {data_path}") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data_path weights must be non-negative with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights], list(data_path[1::2])


def build_sft_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_path: str | None = None,
                       eod_id: int | None = None, *, packed: bool = True,
                       pad_id: int = 0) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Train / valid / test datasets of SFT sequences (see the module docstring); None for an empty split.

    data_path: ["PREFIX_text_document"] or ["w1", "PREFIX1_text_document", "w2", ...] as written by
        tools/preprocess_sft_data.py (the loss mask is read from the matching _loss_mask_document).
    split: Megatron's split weights, e.g. "969,30,1", applied to each dataset's examples.
    num_samples: sequences wanted per split; each dataset repeats epochs (reshuffled) until it has
        at least that many. 0 means one epoch.
    eod_id: when given, every example must end with it (catches data made with another tokenizer).
    """
    weights, prefixes = parse_data_path(data_path)
    sources = [SFTExampleSource(prefix, eod_id) for prefix in prefixes]
    splits_per_source = [split_example_ids(len(source), split, seed) for source in sources]
    results: list[Dataset | None] = []
    for split_index, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[split_index])
        members = [(w, src, ids[split_index]) for w, src, ids in zip(weights, sources, splits_per_source)
                   if w > 0 and len(ids[split_index])]
        if not members:
            results.append(None)
            continue
        if len(members) == 1:
            _, source, ids = members[0]
            results.append(SFTDataset(source, ids, seq_length, seed + split_index, wanted, packed, pad_id,
                                      cache_path, name))
            continue
        member_weights = [w / sum(m[0] for m in members) for w, _, _ in members]

        def member(i: int, samples: int) -> SFTDataset:
            _, src, ids = members[i]
            return SFTDataset(src, ids, seq_length, seed + split_index, samples, packed, pad_id, cache_path,
                              f"{name}{i}")

        # Each member gets its share plus 0.5% (Megatron's margin) so the blend never runs dry;
        # with nothing asked (0), the blend is as long as one epoch of every member together.
        datasets = [member(i, int(math.ceil(w * wanted * 1.005))) for i, w in enumerate(member_weights)]
        size = wanted if wanted > 0 else sum(len(d) for d in datasets)
        datasets = [d if len(d) >= math.ceil(w * size * 1.005) else member(i, int(math.ceil(w * size * 1.005)))
                    for i, (d, w) in enumerate(zip(datasets, member_weights))]
        results.append(BlendedSFTDataset(datasets, member_weights, size))
    train, valid, test = results
    logger.info("SFT datasets: %s", ", ".join(f"{n}={len(d) if d is not None else 0}"
                                              for n, d in zip(SPLIT_NAMES, results)))
    return train, valid, test
