"""The one dataset builder (megatron_lime/data/builder.py): blend forms, GPT and SFT blends alike,
the content-keyed index cache, the build-once-per-node protocol, token ids checked on open."""

import multiprocessing
import os

import numpy as np
import pytest
import torch

from megatron_lime.data import builder
from megatron_lime.data.builder import DatasetConfig, build_blending_indices, build_datasets, parse_data_path
from megatron_lime.data.gpt_dataset import GPTDataset
from megatron_lime.data.indexed_dataset import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, write_index
from megatron_lime.data.sft import dataset as sft_dataset
from megatron_lime.data.sft.dataset import SFTDataset

SEQ = 16


def write_gpt(prefix: str, lengths: list[int], base: int) -> str:
    """Documents whose every token is base + document number (so a sample says where it came from)."""
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for d, n in enumerate(lengths):
            writer.add_document(np.full(n, base + d))
    return prefix


def write_sft(directory, name: str, num_examples: int, base: int, length: int = 10) -> str:
    """An SFT pair of `num_examples` examples; example tokens are `base` then its number, ending in eod 1."""
    prefix = os.path.join(str(directory), name)
    with IndexedDatasetWriter(prefix + "_text_document", np.uint16) as text, \
            IndexedDatasetWriter(prefix + "_loss_mask_document", np.uint8) as mask:
        for i in range(num_examples):
            text.add_document(np.array([base] + [base + 1 + i % 50] * (length - 2) + [1]))
            mask.add_document(np.array([0] * (length // 2) + [1] * (length - length // 2)))
    return prefix + "_text_document"


def test_blend_forms(tmp_path):
    a, b = write_gpt(str(tmp_path / "a"), [50] * 10, 0), write_gpt(str(tmp_path / "b"), [50] * 30, 1000)
    assert len(parse_data_path([a])) == 1 and np.isnan(parse_data_path([a])[0][0])
    unweighted = parse_data_path([a, b])
    assert [p for _, p in unweighted] == [a, b] and all(np.isnan(w) for w, _ in unweighted)
    assert parse_data_path([f"0.7 {a} 0.3 {b}"]) == parse_data_path(["0.7", a, "0.3", b]) == [(0.7, a), (0.3, b)]
    listing = tmp_path / "blend.txt"
    listing.write_text(f"# the mixture\n0.7 {a}   # web\n0.3 {b}\n")
    assert parse_data_path([str(listing)]) == [(0.7, a), (0.3, b)]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no datasets"):
        parse_data_path([str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_data_path(["0.7", a, "b", b])
    with pytest.raises(ValueError, match="not all zero"):
        parse_data_path(["0", a, "0", b])
    # `A B` is weighted by size (tokens): b has three times a's tokens.
    train, _, _ = build_datasets(GPTDataset, DatasetConfig(data_path=[a, b], split="1,0,0", seq_length=SEQ, seed=1,
                                                           num_samples=(400, 0, 0), cache_path=str(tmp_path / "c")))
    assert np.bincount(train.dataset_index).tolist() == [100, 300]


def test_sft_blend_forms_parse_like_pretraining(tmp_path):
    """The old SFT parser read "0.7 A 0.3 B" as one prefix and rejected "A B"."""
    a, b = write_sft(tmp_path, "a", 40, 100), write_sft(tmp_path, "b", 120, 200)
    one_string, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[f"0.7 {a} 0.3 {b}"], split="1,0,0",
                                                                seq_length=SEQ, seed=1, num_samples=(200, 0, 0)))
    assert np.bincount(one_string.dataset_index).tolist() == [140, 60]
    by_size, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[a, b], split="1,0,0", seq_length=SEQ, seed=1,
                                                             num_samples=(200, 0, 0)))
    assert np.bincount(by_size.dataset_index).tolist() == [50, 150]  # 40 vs 120 examples of equal length
    (tmp_path / "mix.txt").write_text(f"0.7 {a}\n0.3 {b}\n")
    listed, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[str(tmp_path / "mix.txt")], split="1,0,0",
                                                            seq_length=SEQ, seed=1, num_samples=(200, 0, 0)))
    assert np.array_equal(listed.dataset_index, one_string.dataset_index)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.2, 0.5, 0.3)])
def test_weighted_sft_blend_lands_on_its_weights(tmp_path, weights):
    prefixes = [write_sft(tmp_path, f"d{i}", 30 + 17 * i, 100 * (i + 1)) for i in range(len(weights))]
    data_path = [str(x) for pair in zip(weights, prefixes) for x in pair]
    train, valid, _ = build_datasets(SFTDataset, DatasetConfig(data_path=data_path, split="9,1,0", seq_length=SEQ,
                                                               seed=3, num_samples=(3000, 50, 0),
                                                               cache_path=str(tmp_path / "c")))
    assert len(train) == 3000 and len(valid) == 50
    realised = np.bincount(train.dataset_index, minlength=len(weights)) / len(train)
    np.testing.assert_allclose(realised, weights, atol=0.01)
    # Every served sequence comes from the dataset the index names (first token = 100 * (dataset + 1)).
    for k in range(0, 3000, 41):
        first_token = int(train[k]["input_ids"][0])
        assert first_token == 100 * (int(train.dataset_index[k]) + 1)
    # GPT and SFT blends are the same C++ order for the same weights and size.
    gpt = [write_gpt(str(tmp_path / f"g{i}"), [40] * 50, 10_000 * i) for i in range(len(weights))]
    gpt_path = [str(x) for pair in zip(weights, gpt) for x in pair]
    gpt_train, _, _ = build_datasets(GPTDataset, DatasetConfig(data_path=gpt_path, split="9,1,0", seq_length=SEQ,
                                                               seed=3, num_samples=(3000, 50, 0),
                                                               cache_path=str(tmp_path / "c")))
    assert np.array_equal(gpt_train.dataset_index, train.dataset_index)
    assert np.array_equal(train.dataset_index, build_blending_indices(np.asarray(weights) / sum(weights), 3000)[0])


def test_no_python_blend_loop_is_left():
    assert not hasattr(sft_dataset, "blend_indices") and not hasattr(sft_dataset, "BlendedSFTDataset")
    assert not hasattr(sft_dataset, "parse_data_path")


def _same_size_and_mtime_rewrite(path: str, transform) -> None:
    stat = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    new = transform(data)
    assert len(new) == len(data) and new != data
    with open(path, "wb") as f:
        f.write(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cache_is_keyed_on_content_not_mtime(tmp_path):
    prefix = write_gpt(str(tmp_path / "g"), [30, 50, 70, 90], 0)
    cache = str(tmp_path / "cache")
    first = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                     num_samples=(10, 0, 0), cache_path=cache))[0]
    # Same size, same mtime, other tokens in the .bin: another key.
    _same_size_and_mtime_rewrite(prefix + ".bin", lambda data: bytes([data[0] ^ 1]) + data[1:])
    after_bin = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                         num_samples=(10, 0, 0), cache_path=cache))[0]
    assert after_bin.cache_key != first.cache_key
    # Same size, same mtime, other document lengths in the .idx: another key, and indices built for them.
    stat = os.stat(prefix + ".idx")
    write_index(prefix + ".idx", np.int32, [90, 70, 50, 30])
    os.utime(prefix + ".idx", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(prefix + ".idx") == stat.st_size
    after_idx = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                         num_samples=(10, 0, 0), cache_path=cache))[0]
    assert after_idx.cache_key not in (first.cache_key, after_bin.cache_key)
    assert after_idx.indexed.sequence_lengths.tolist() == [90, 70, 50, 30]
    # Nothing changed: the cached arrays are reused.
    again = build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                     num_samples=(10, 0, 0), cache_path=cache))[0]
    assert again.cache_key == after_idx.cache_key and isinstance(again.sample_index, np.memmap)


def test_sft_plans_share_the_content_keyed_cache(tmp_path):
    prefix = write_sft(tmp_path, "s", 60, 100)
    cache = str(tmp_path / "cache")
    first, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                           num_samples=(100, 0, 0), cache_path=cache))
    assert any(n.endswith("SFTDataset-train-examples.npy") for n in os.listdir(cache))
    again, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                           num_samples=(100, 0, 0), cache_path=cache))
    assert again.cache_key == first.cache_key and isinstance(again.plan.examples, np.memmap)
    _same_size_and_mtime_rewrite(prefix + ".bin", lambda data: data[:4] + bytes([data[4] ^ 1]) + data[5:])
    changed, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ,
                                                             seed=1, num_samples=(100, 0, 0), cache_path=cache))
    assert changed.cache_key != first.cache_key


def test_token_ids_are_checked_against_the_vocabulary_on_open(tmp_path):
    prefix = write_gpt(str(tmp_path / "g"), [20] * 5, 0)  # ids 0..4
    with IndexedDatasetWriter(str(tmp_path / "bad"), np.uint16) as writer:
        writer.add_document(np.arange(10))
        writer.add_document(np.array([3, 4, 600, 5]))  # 600 >= a 512-id vocabulary
    build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                             num_samples=(5, 0, 0), vocab_size=5))
    with pytest.raises(IndexedDatasetError, match=r"bad\.bin: token id 600 \(document 1, token 2; 1 such ids"):
        build_datasets(GPTDataset, DatasetConfig(data_path=[prefix, str(tmp_path / "bad")], split="1,0,0",
                                                 seq_length=SEQ, seed=1, num_samples=(5, 0, 0), vocab_size=512))
    sft = write_sft(tmp_path, "s", 10, 300)
    with pytest.raises(IndexedDatasetError, match=r"s_text_document\.bin: token id 3\d\d .* vocabulary of 300 ids"):
        build_datasets(SFTDataset, DatasetConfig(data_path=[sft], split="1,0,0", seq_length=SEQ, seed=1,
                                                 num_samples=(5, 0, 0), vocab_size=300))


def test_the_token_id_scan_is_cached_with_the_data_fingerprint(tmp_path, monkeypatch):
    prefix = write_gpt(str(tmp_path / "g"), [20] * 5, 0)
    cache = str(tmp_path / "cache")
    build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                             num_samples=(5, 0, 0), cache_path=cache, vocab_size=5))
    assert any("TokenRange" in name for name in os.listdir(cache))

    def must_not_scan(self):
        raise AssertionError("the .bin was scanned again although its token range is cached")

    monkeypatch.setattr(IndexedDataset, "token_range", must_not_scan)
    build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                             num_samples=(5, 0, 0), cache_path=cache, vocab_size=5))
    monkeypatch.undo()
    with pytest.raises(IndexedDatasetError, match="token id 4"):  # the cached range still catches a smaller vocabulary
        build_datasets(GPTDataset, DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                 num_samples=(5, 0, 0), cache_path=cache, vocab_size=4))


def _builds_in_process(rank: int, world: int, init_file: str, kind: str, prefix: str, caches: list[str],
                       local_ranks: list[int], out: str, fail_on_rank: int) -> None:
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counter = {"n": 0}
        module, name = (sft_dataset, "plan_sequences") if kind == "sft" else (builder, "build_blending_indices")
        original = getattr(module, name)

        def counting(*args, **kwargs):
            counter["n"] += 1
            if rank == fail_on_rank:
                raise RuntimeError("injected build failure")
            return original(*args, **kwargs)

        if kind == "sft":
            setattr(module, name, counting)
            config = DatasetConfig(data_path=[prefix], split="1,0,0", seq_length=SEQ, seed=1, num_samples=(50, 0, 0),
                                   cache_path=caches[rank])
            train = build_datasets(SFTDataset, config)[0]
        else:  # count the blend's C++ build (one per BlendedDataset) on a GPT blend
            train = None
            config = DatasetConfig(data_path=["1", prefix, "1", prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                   num_samples=(50, 0, 0), cache_path=caches[rank])
            original_init = builder.BlendedDataset.__init__

            def init(self, *args, **kwargs):
                builder.build_blending_indices = counting
                try:
                    original_init(self, *args, **kwargs)
                finally:
                    builder.build_blending_indices = original

            builder.BlendedDataset.__init__ = init
            train = build_datasets(GPTDataset, config)[0]
        np.save(f"{out}-{rank}.npy", np.array([counter["n"], *train[7]["input_ids"].tolist()]))
    except RuntimeError as e:
        np.save(f"{out}-{rank}.npy", np.array([-1]))
        raise SystemExit(3) from e
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(tmp_path, kind: str, prefix: str, caches: list[str], local_ranks: list[int], fail_on_rank: int = -1):
    context = multiprocessing.get_context("fork")
    out = str(tmp_path / f"out-{kind}")
    init = str(tmp_path / f"init-{kind}-{len(os.listdir(tmp_path))}")
    procs = [context.Process(target=_builds_in_process,
                             args=(rank, 2, init, kind, prefix, caches, local_ranks, out, fail_on_rank))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes, [np.load(f"{out}-{rank}.npy") for rank in range(2)]


@pytest.mark.parametrize("kind", ["sft", "gpt"])
def test_rank_zero_of_each_node_builds_the_others_wait_and_load(tmp_path, kind):
    prefix = write_sft(tmp_path, "s", 40, 100) if kind == "sft" else write_gpt(str(tmp_path / "g"), [40] * 40, 0)
    shared = str(tmp_path / "shared")
    # One node, one shared cache: rank 0 builds, rank 1 waits and loads.
    codes, (rank0, rank1) = run_ranks(tmp_path, kind, prefix, [shared, shared], local_ranks=[0, 1])
    assert codes == [0, 0] and rank0[0] == 1 and rank1[0] == 0
    np.testing.assert_array_equal(rank0[1:], rank1[1:])
    # Two nodes with their own (not shared) cache directories: each node's first rank builds.
    own = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    codes, (rank0, rank1) = run_ranks(tmp_path, kind, prefix, own, local_ranks=[0, 0])
    assert codes == [0, 0] and rank0[0] == 1 and rank1[0] == 1
    np.testing.assert_array_equal(rank0[1:], rank1[1:])
    # Two nodes sharing one directory: the second finds the first's files and builds nothing.
    fresh = str(tmp_path / "fresh")
    codes, (rank0, rank1) = run_ranks(tmp_path, kind, prefix, [fresh, fresh], local_ranks=[0, 0])
    assert codes == [0, 0] and rank0[0] == 1 and rank1[0] == 0


def test_a_failed_build_on_rank_zero_fails_every_rank_instead_of_hanging(tmp_path):
    prefix = write_sft(tmp_path, "s", 40, 100)
    shared = str(tmp_path / "shared")
    codes, results = run_ranks(tmp_path, "sft", prefix, [shared, shared], local_ranks=[0, 1], fail_on_rank=0)
    assert codes[0] == 3 and codes[1] == 0  # rank 1 was not failed: it built in memory after the barriers
    assert results[0].tolist() == [-1] and results[1][0] == 1
    assert not os.path.exists(shared) or not any(n.endswith("description.json") for n in os.listdir(shared))
