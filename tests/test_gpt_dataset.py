"""GPT pretraining samples: coverage, document order, determinism, splits, blending, index cache."""

import os

import numpy as np
import pytest
import torch
from helpers import make_tiny_pretraining_data

from megatron_lime.data import gpt_dataset
from megatron_lime.data.builder import (DatasetConfig, build_blending_indices, build_datasets, parse_data_path,
                                        parse_split)
from megatron_lime.data.gpt_dataset import GPTDataset, build_sample_index, split_document_ranges
from megatron_lime.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    prefix, tokenizer_dir = make_tiny_pretraining_data(str(tmp_path_factory.mktemp("gpt")))
    return prefix


def write_synthetic(prefix: str, lengths: list[int], base: int = 0) -> list[np.ndarray]:
    """Documents whose tokens say where they come from: doc d's token t is base + d * 1000 + t (t < 1000)."""
    docs = [np.arange(n, dtype=np.int64) + 1000 * d + base for d, n in enumerate(lengths)]
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for doc in docs:
            writer.add_document(doc)
    return docs


def reference_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                           num_samples: int) -> np.ndarray:
    """Pure numpy: the (position in document_index, offset) of stream position i * seq_length."""
    lengths = sizes[document_index]
    ends = np.cumsum(lengths)
    positions = np.arange(num_samples + 1) * seq_length
    j = np.searchsorted(ends, positions, side="right")
    starts = ends - lengths
    return np.stack([j, positions - starts[j]], axis=1)


def test_sample_index_matches_reference():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 40, size=300).astype(np.int32)
    sizes[::7] = 0  # empty documents are stepped over
    document_index = np.concatenate([rng.permutation(300), rng.permutation(300)])
    total = int(sizes[document_index].sum())
    for seq_length in (1, 7, 64, 513):
        n = (total - 1) // seq_length
        got = build_sample_index(sizes, document_index, seq_length, n)
        assert got.shape == (n + 1, 2)
        np.testing.assert_array_equal(got, reference_sample_index(sizes, document_index, seq_length, n))


def test_sample_index_errors():
    sizes = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match=r"document_index\[1\] = 5 is outside \[0, 2\)"):
        build_sample_index(sizes, np.array([0, 5]), 2, 1)
    with pytest.raises(ValueError, match="need 9 tokens, the documents have 7"):
        build_sample_index(sizes, np.array([0, 1]), 4, 2)
    with pytest.raises(ValueError, match="seq_length must be >= 1"):
        build_sample_index(sizes, np.array([0, 1]), 0, 1)


def test_epoch_covers_every_token_once_in_document_order(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=60).tolist()
    docs = write_synthetic(str(tmp_path / "syn"), lengths)
    ds = IndexedDataset(str(tmp_path / "syn"))
    seq_length = 32
    total = sum(lengths)
    one_epoch = (total - 1) // seq_length
    gpt = GPTDataset(ds, (0, 60), seq_length, one_epoch, seed=5, cache_dir=str(tmp_path / "cache"))
    assert gpt.num_epochs == 1 and len(gpt) == one_epoch
    samples = [gpt[k] for k in range(len(gpt))]
    for s in samples:
        assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (seq_length,)
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
        assert torch.equal(s["input_ids"][1:], s["labels"][:-1])
    inputs = np.concatenate([s["input_ids"].numpy() for s in samples])
    # Every token appears as an input exactly once, except the tail that does not fill a sample.
    values, counts = np.unique(inputs, return_counts=True)
    assert counts.max() == 1 and len(values) == one_epoch * seq_length >= total - seq_length
    # Within each document, tokens appear in order and contiguously in the stream of (unshuffled) samples.
    stream = np.concatenate([s["input_ids"].numpy() for s in (samples[k] for k in np.argsort(gpt.shuffle_index))])
    docs_in_order = np.concatenate([docs[d] for d in gpt.document_index])
    np.testing.assert_array_equal(stream, docs_in_order[: len(stream)])
    # The document order is a shuffle (not the file order), and samples are served shuffled.
    assert sorted(gpt.document_index.tolist()) == list(range(60)) and gpt.document_index.tolist() != list(range(60))
    assert gpt.shuffle_index.tolist() != list(range(len(gpt)))


def test_epochs_are_served_one_after_another(tmp_path):
    write_synthetic(str(tmp_path / "syn"), [50] * 20)
    ds = IndexedDataset(str(tmp_path / "syn"))
    gpt = GPTDataset(ds, (0, 20), 16, 150, seed=1, cache_dir=None)
    assert gpt.num_epochs == 3 and len(gpt) >= 150
    # Epoch of served sample k = epoch of its first token; it must never decrease.
    epochs = [int(gpt.shuffle_index[k]) * 16 // 1000 for k in range(len(gpt))]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1, 2}
    # Each epoch shuffles documents differently.
    assert gpt.document_index[:20].tolist() != gpt.document_index[20:40].tolist()


def test_deterministic_and_random_access(tiny, tmp_path):
    a = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,9,1", seq_length=64, seed=1234,
                                                 num_samples=(300, 20, 5), cache_path=str(tmp_path / "a")))[0]
    b = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,9,1", seq_length=64, seed=1234,
                                                 num_samples=(300, 20, 5), cache_path=str(tmp_path / "b")))[0]
    c = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,9,1", seq_length=64, seed=99,
                                                 num_samples=(300, 20, 5), cache_path=str(tmp_path / "c")))[0]
    for k in (299, 0, 150, 7):  # any order: sample k needs nothing but k
        assert torch.equal(a[k]["input_ids"], b[k]["input_ids"])
    assert any(not torch.equal(a[k]["input_ids"], c[k]["input_ids"]) for k in range(10))


def test_split_by_document(tiny):
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert split_document_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    # Megatron-LM: bounds 0, 2, 4, 6 rounded, then shifted by the shortfall of 1 after the first.
    assert split_document_ranges(7, parse_split("1,1,1")) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="--split"):
        parse_split("1,2,3,4")
    train, valid, test = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,10,0", seq_length=32,
                                                                  seed=1, num_samples=(100, 10, 10), cache_path=None))
    assert test is None  # no documents
    assert train.document_range == (0, 180) and valid.document_range == (180, 200)
    assert set(train.document_index.tolist()).isdisjoint(valid.document_index.tolist())
    assert build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,10,0", seq_length=32, seed=1,
                                                    num_samples=(100, 0, 0), cache_path=None))[1] is None


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2)])
def test_blend_fractions(tmp_path, weights):
    prefixes = []
    for i in range(len(weights)):
        write_synthetic(str(tmp_path / f"d{i}"), [100 + 37 * i] * 30, base=100_000 * i)
        prefixes += [str(weights[i]), str(tmp_path / f"d{i}")]
    train, valid, _ = build_datasets(GPTDataset, DatasetConfig(data_path=prefixes, split="9,1,0", seq_length=16,
                                                               seed=3, num_samples=(2000, 100, 0),
                                                               cache_path=str(tmp_path / "c")))
    assert len(train) == 2000 and len(valid) == 100
    realised = np.bincount(train.dataset_index, minlength=len(weights)) / len(train)
    np.testing.assert_allclose(realised, weights, atol=0.01)
    # Every prefix of the order is balanced too (greedy: within one sample of weight * n).
    first = np.bincount(train.dataset_index[:100], minlength=len(weights))
    assert np.all(np.abs(first - 100 * np.array(weights)) <= 1)
    # Samples really come from the dataset the index names (token values encode the dataset).
    for k in range(0, 2000, 37):
        assert set((train[k]["input_ids"] // 100_000).tolist()) == {int(train.dataset_index[k])}
    # Each dataset's samples are used in order 0, 1, 2, ...
    dataset_index, sample_index = build_blending_indices(weights, 500)
    assert dataset_index.dtype == np.int16
    for d in range(len(weights)):
        assert sample_index[dataset_index == d].tolist() == list(range(int((dataset_index == d).sum())))


def test_data_path_parsing(tiny):
    assert parse_data_path([tiny]) != [] and np.isnan(parse_data_path([tiny])[0][0])
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_data_path(["0.7 a 0.3 b"]) == [(0.7, "a"), (0.3, "b")]
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_data_path(["0.7", "a", "0.3"])


def test_cache_reuse_and_invalidation(tiny, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,9,1", seq_length=64, seed=7,
                                                     num_samples=(200, 10, 0), cache_path=cache))[0]
    files = sorted(os.listdir(cache))
    assert any(f.endswith("GPTDataset-train-sample_index.npy") for f in files)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the index was rebuilt although it is cached")

    monkeypatch.setattr(gpt_dataset, "build_sample_index", must_not_build)
    again = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,9,1", seq_length=64, seed=7,
                                                     num_samples=(200, 10, 0), cache_path=cache))[0]
    assert again.cache_key == first.cache_key
    assert isinstance(again.sample_index, np.memmap)
    assert torch.equal(again[17]["input_ids"], first[17]["input_ids"])
    monkeypatch.undo()

    keys = {first.cache_key}
    for change in [dict(seq_length=32), dict(seed=8), dict(num_samples=(900, 10, 0)), dict(split="80,19,1")]:
        args = dict(data_path=[tiny], split="90,9,1", seq_length=64, seed=7, num_samples=(200, 10, 0), cache_path=cache)
        args.update(change)
        keys.add(build_datasets(GPTDataset, DatasetConfig(**args))[0].cache_key)
    assert len(keys) == 5


def test_changed_data_is_not_served_from_a_stale_cache(tmp_path):
    prefix = str(tmp_path / "syn")
    write_synthetic(prefix, [100] * 10)
    cache = str(tmp_path / "cache")
    before = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=16, seed=1,
                                                      num_samples=(20, 0, 0), cache_path=cache))[0]
    write_synthetic(prefix, [101] * 10)  # re-preprocessed: same prefix, different documents
    after = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=16, seed=1,
                                                     num_samples=(20, 0, 0), cache_path=cache))[0]
    assert after.cache_key != before.cache_key
    default = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=16, seed=1,
                                                       num_samples=(20, 0, 0)))[0]
    description = f"{default.cache_key}-GPTDataset-train-description.json"
    assert os.path.isfile(os.path.join(str(tmp_path), "index-cache", description))


def test_dataloader_batches(tiny):
    train = build_datasets(GPTDataset, DatasetConfig(data_path=[tiny], split="90,9,1", seq_length=64, seed=1,
                                                     num_samples=(16, 0, 0), cache_path=None))[0]
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].dtype == torch.long
    assert batch["loss_mask"].shape == (4, 64)


def _distributed_build(rank: int, world_size: int, init_file: str, prefix: str, cache: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        built = {"n": 0}
        original = gpt_dataset.build_sample_index

        def counting(*args, **kwargs):
            built["n"] += 1
            return original(*args, **kwargs)

        gpt_dataset.build_sample_index = counting
        train = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="90,9,1", seq_length=32, seed=11,
                                                         num_samples=(100, 10, 0), cache_path=cache))[0]
        np.save(f"{out}-{rank}.npy", np.array([built["n"], *train[42]["input_ids"].tolist()]))
    finally:
        torch.distributed.destroy_process_group()


def test_rank_zero_builds_other_ranks_load(tiny, tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    args = (2, str(tmp_path / "init"), tiny, str(tmp_path / "cache"), str(tmp_path / "out"))
    procs = [context.Process(target=_distributed_build, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    rank0, rank1 = np.load(str(tmp_path / "out-0.npy")), np.load(str(tmp_path / "out-1.npy"))
    assert rank0[0] == 2 and rank1[0] == 0  # rank 0 built train and valid; rank 1 only loaded
    np.testing.assert_array_equal(rank0[1:], rank1[1:])
