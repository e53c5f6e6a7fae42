"""Datasets and the order in which each rank reads them.

Sample order is fixed by the sample index alone (the datasets compute sample k without
reading 0..k-1), so the data position of a run is one number: consumed_samples.
Step n uses samples [n * G, (n + 1) * G) of the training set (G = global batch size);
like Megatron's sampler, micro-batch m of that step gives data-parallel rank r the samples

    n * G + m * (B * R) + r * B + [0, B)        (B = micro batch size, R = data-parallel size)

so every step sees the same G samples whatever R is: resuming at another data-parallel size
(universal checkpoint) continues with exactly the samples the old run would have used next.
"""

from __future__ import annotations

import os
import signal
from functools import partial
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from megatron_lime.errors import LimeInputError
from megatron_lime.training.config import TrainArgs
from megatron_lime.training.failures import die_with_parent, inject_fault


class MicroBatchSampler(Sampler[list[int]]):
    """Index lists of one rank's micro-batches, from `consumed_samples` up to `total_samples`."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 rank: int, data_parallel_size: int):
        if consumed_samples > total_samples:
            raise ValueError(f"consumed samples {consumed_samples} exceed the {total_samples} samples of the run")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        stride = self.micro_batch_size * self.data_parallel_size
        for start in range(self.consumed_samples, self.total_samples - stride + 1, stride):
            first = start + self.rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def _init_worker(parent_pid: int, worker_id: int) -> None:
    # A SIGTERM/SIGINT for the whole process tree (Ctrl-C, SLURM, a launcher) must not kill a worker while
    # its rank may still be saving: torch turns a dead worker into an error raised in the rank at a random
    # point. The rank decides (megatron_lime/training/failures.py); its workers die with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # inherited from the rank: the rank's signal watcher reads that pipe
    die_with_parent(parent_pid)


def _collate(samples: list) -> dict[str, torch.Tensor]:
    inject_fault("worker")
    return default_collate(samples)


def build_loader(dataset: Dataset, sampler: MicroBatchSampler, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=_collate, worker_init_fn=partial(_init_worker, os.getpid()) if num_workers else None,
                      persistent_workers=False)


def dataset_spec(args: TrainArgs, num_samples: tuple[int, int, int], pad_id: int, eod_id: int | None):
    """(dataset type, DatasetConfig) of a run for megatron_lime.data.builder.build_datasets, the one entry point.

    --dataset-type gpt or sft; vocab_size is the model's, so every token id is checked when the data is opened
    and a dataset made with another tokenizer fails then with its file named, not inside a training step.
    eod_id: SFT examples must end with it (pretraining data has its <eos> in the .bin already).
    """
    from megatron_lime.data.builder import DatasetConfig

    data = args.data
    if not data.data_path:
        raise LimeInputError("--data-path is required (or set DATA_PATH for the example scripts)")
    config = DatasetConfig(data_path=data.data_path, split=data.split, seq_length=args.seq_length,
                           seed=args.training.seed, num_samples=num_samples, cache_path=data.data_cache_path,
                           vocab_size=args.model.vocab_size)
    if data.dataset_type == "gpt":
        from megatron_lime.data.gpt_dataset import GPTDataset

        return GPTDataset, config
    from megatron_lime.data.sft.dataset import SFTDataset, SFTOptions

    config.options = SFTOptions(eod_id=eod_id, packed=data.sft_packing, pad_id=pad_id)
    return SFTDataset, config


MODEL_INPUTS = ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs from a collated batch, on the device (SFT batches add position/document ids)."""
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise KeyError(f"dataset items lack {missing}; they need input_ids, labels and loss_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
