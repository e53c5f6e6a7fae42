"""Which input files one preprocessing job of many takes (`--num-shards N --shard-index I`).

Shards are contiguous runs of the input list (sorted, as `find_inputs` returns it), cut where
the running total of file sizes crosses k/N of the whole, so each job gets about the same
number of bytes and the shards, merged in shard order, hold the documents in exactly the
order of one run over every input. Every job computes the same cut from the same listing
(on a shared file system the sizes are the same everywhere), so no coordination is needed.

    sources = find_inputs("fineweb-edu/CC-MAIN-2025-05/*.parquet")
    mine = shard_inputs(sources, num_shards=16, shard_index=int(os.environ["SLURM_ARRAY_TASK_ID"]))
"""

from __future__ import annotations

import bisect
import os
from typing import Sequence, TypeVar

T = TypeVar("T")


def input_size(path: str) -> int:
    """Bytes of a file, or of every file under a directory (a saved `datasets` dataset)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def shard_bounds(sizes: Sequence[int], num_shards: int) -> list[int]:
    """Cut points [0, c1, ..., n]: shard k is items [c_k, c_k+1); contiguous and size-balanced.

    Item i goes to the shard whose share of the total bytes holds the middle of item i, so a
    large file is never split; every shard has at least one item when there are enough items.
    """
    if num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}")
    total = sum(sizes)
    if total == 0:  # all empty: share them out by count instead
        return [len(sizes) * k // num_shards for k in range(num_shards + 1)]
    middles, running = [], 0
    for size in sizes:
        middles.append(running + size / 2)
        running += size
    # The first item whose middle lies at or beyond k/N of the bytes starts shard k.
    bounds = [0] + [bisect.bisect_left(middles, total * k / num_shards) for k in range(1, num_shards)] + [len(sizes)]
    if len(sizes) >= num_shards:  # no idle job while there are enough files: at least one each
        for k in range(1, num_shards):
            bounds[k] = min(max(bounds[k], bounds[k - 1] + 1), len(sizes) - (num_shards - k))
    return bounds


def shard_inputs(items: Sequence[T], num_shards: int, shard_index: int, sizes: Sequence[int] | None = None) -> list[T]:
    """Shard `shard_index` of `num_shards` of `items` (InputSource objects or paths), in their order."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}, "
                         f"got {shard_index}")
    if sizes is None:
        sizes = [input_size(getattr(item, "path", item)) for item in items]  # type: ignore[arg-type]
    bounds = shard_bounds(sizes, num_shards)
    return list(items[bounds[shard_index]:bounds[shard_index + 1]])


def shard_suffix(num_shards: int, shard_index: int) -> str:
    """What a shard adds to --output-prefix; zero-padded so that name order is shard order."""
    return f"_shard{shard_index:05d}-of-{num_shards:05d}"
