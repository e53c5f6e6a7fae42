"""megatron_lime/data/shards.py: which input files each of N preprocessing jobs takes."""

import random

import pytest

from megatron_lime.data.shards import shard_bounds, shard_inputs, shard_suffix


@pytest.mark.parametrize("num_items, num_shards", [(1, 1), (7, 3), (10, 10), (3, 5), (100, 16), (513, 8)])
def test_shards_are_contiguous_cover_everything_and_are_deterministic(num_items, num_shards):
    rng = random.Random(num_items * 31 + num_shards)
    items = [f"file_{i:04d}.parquet" for i in range(num_items)]
    sizes = [rng.randint(1, 1000) for _ in items]
    shards = [shard_inputs(items, num_shards, k, sizes) for k in range(num_shards)]
    # Concatenated in shard order they are the input list itself: merge order = single-run order.
    assert [item for shard in shards for item in shard] == items
    assert shards == [shard_inputs(list(items), num_shards, k, list(sizes)) for k in range(num_shards)]
    if num_items >= num_shards:
        assert all(shards), "no shard is empty while there are enough files"


def test_shards_balance_bytes_not_counts():
    # One big file then many small ones: the big one is a shard of its own.
    sizes = [900] + [10] * 10
    assert shard_bounds(sizes, 2) == [0, 1, 11]
    equal = [5] * 12
    assert shard_bounds(equal, 4) == [0, 3, 6, 9, 12]
    assert shard_bounds([0, 0, 0, 0], 2) == [0, 2, 4]


def test_paths_and_sizes_from_disk(tmp_path):
    paths = []
    for i, size in enumerate([100, 100, 100, 300]):
        path = tmp_path / f"part-{i}.jsonl"
        path.write_bytes(b"x" * size)
        paths.append(str(path))
    assert shard_inputs(paths, 2, 0) == paths[:3] and shard_inputs(paths, 2, 1) == paths[3:]


def test_bad_shard_arguments():
    with pytest.raises(ValueError, match="--shard-index must be in 0..3 for --num-shards 4, got 4"):
        shard_inputs(["a"], 4, 4, [1])
    with pytest.raises(ValueError, match="--num-shards must be at least 1"):
        shard_bounds([1], 0)


def test_suffix_sorts_in_shard_order():
    names = [f"out{shard_suffix(12, k)}_text_document.idx" for k in range(12)]
    assert sorted(names) == names
