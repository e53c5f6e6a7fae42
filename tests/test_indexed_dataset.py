"""Megatron-LM's .bin/.idx format: our writer and reader against an independent one written from the format
description."""

import os
import struct

import numpy as np
import pytest

from megatron_lime.data.indexed_dataset import (IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
                                                best_dtype)

# --- An independent implementation, from the format description only (megatron_lime/data/README.md):
# header b"MMIDIDX\x00\x00", <Q version 1, <B dtype code, <Q sequence count, <Q document-index count,
# int32 lengths, int64 byte pointers, int64 document indices; tokens back to back in the .bin.
CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def reference_write(prefix: str, documents: list[list[int]], code: int) -> None:
    dtype = np.dtype(CODES[code])
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            f.write(np.array(doc, dtype=dtype).tobytes())
    lengths = [len(d) for d in documents]
    pointers, position = [], 0
    for n in lengths:
        pointers.append(position)
        position += n * dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(documents)))
        f.write(struct.pack("<Q", len(documents) + 1))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(documents) + 1}q", *range(len(documents) + 1)))


def reference_read(prefix: str) -> list[list[int]]:
    with open(prefix + ".idx", "rb") as f:
        data = f.read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", data[9:17])[0] == 1
    dtype = np.dtype(CODES[data[17]])
    count, doc_count = struct.unpack("<QQ", data[18:34])
    lengths = struct.unpack(f"<{count}i", data[34:34 + 4 * count])
    pointers = struct.unpack(f"<{count}q", data[34 + 4 * count:34 + 12 * count])
    doc_index = struct.unpack(f"<{doc_count}q", data[34 + 12 * count:34 + 12 * count + 8 * doc_count])
    assert list(doc_index) == list(range(count + 1))
    with open(prefix + ".bin", "rb") as f:
        tokens = f.read()
    return [np.frombuffer(tokens, dtype=dtype, count=n, offset=p).tolist() for n, p in zip(lengths, pointers)]


def random_documents(n: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(0, 300))).tolist() for _ in range(n)]


@pytest.mark.parametrize("vocab_size, dtype, code",
                         [(50_000, np.uint16, 8), (65_500, np.int32, 4), (128_256, np.int32, 4)])
def test_writer_is_byte_identical_to_reference(tmp_path, vocab_size, dtype, code):
    assert best_dtype(vocab_size) is dtype
    docs = random_documents(57, vocab_size)
    with IndexedDatasetWriter(str(tmp_path / "ours"), best_dtype(vocab_size)) as writer:
        for i, doc in enumerate(docs):
            if i % 2:
                writer.add_document(doc)
            else:
                writer.add_documents(np.array(doc), np.array([len(doc)]))
    reference_write(str(tmp_path / "ref"), docs, code)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    assert reference_read(str(tmp_path / "ours")) == docs


def test_reader_reads_reference_files(tmp_path):
    docs = random_documents(40, 50_000, seed=1) + [[], [7]]
    reference_write(str(tmp_path / "ref"), docs, 8)
    ds = IndexedDataset(str(tmp_path / "ref"))
    assert len(ds) == len(docs) and ds.num_documents == len(docs) and ds.dtype is np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds[-1].tolist() == [7]
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert ds.get(3, offset=2, length=5).tolist() == docs[3][2:7]
    assert ds.get(3, offset=10).tolist() == docs[3][10:]
    assert ds.num_tokens == sum(len(d) for d in docs)
    with pytest.raises(IndexError):
        ds.get(3, offset=len(docs[3]), length=1)
    with pytest.raises(IndexError):
        ds[len(docs)]
    # The .bin / .idx suffix is accepted in place of the prefix.
    assert len(IndexedDataset(str(tmp_path / "ref.bin"))) == len(docs)


def test_exception_in_context_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "broken")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("reader failed")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
        with pytest.raises(ValueError, match="do not fit uint16"):
            writer.add_document([1, 70_000])
        with pytest.raises(ValueError, match="lengths sum"):
            writer.add_documents(np.array([1, 2, 3]), np.array([2]))


def test_empty_dataset(tmp_path):
    IndexedDatasetWriter(str(tmp_path / "empty"), np.uint16).finalize()
    ds = IndexedDataset(str(tmp_path / "empty"))
    assert len(ds) == 0 and ds.num_tokens == 0
    assert reference_read(str(tmp_path / "empty")) == []


@pytest.fixture
def good_pair(tmp_path):
    docs = random_documents(20, 1000, seed=2)
    reference_write(str(tmp_path / "d"), docs, 8)
    return str(tmp_path / "d")


def test_truncated_bin(good_pair):
    with open(good_pair + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(good_pair + ".bin") - 2)
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: .*truncated"):
        IndexedDataset(good_pair)


def test_truncated_idx(good_pair):
    with open(good_pair + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(good_pair + ".idx") - 8)
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: .*truncated or corrupt"):
        IndexedDataset(good_pair)
    with open(good_pair + ".idx", "r+b") as f:
        f.truncate(20)
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: truncated index"):
        IndexedDataset(good_pair)


@pytest.mark.parametrize("offset, value, message", [
    (0, b"XXIDIDX\x00\x00", "magic"),
    (9, struct.pack("<Q", 2), "version 2"),
    (17, bytes([9]), "unknown dtype code 9"),
    (17, bytes([4]), "sequence pointers do not follow the lengths"),  # int32: pointers would be twice as far apart
    (34, struct.pack("<i", -1), "corrupt"),
])
def test_corrupt_idx(good_pair, offset, value, message):
    with open(good_pair + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(value)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(good_pair)


def test_missing_file(good_pair):
    os.remove(good_pair + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: file not found"):
        IndexedDataset(good_pair)


def test_dtype_must_fit_vocabulary(good_pair):
    IndexedDataset(good_pair, vocab_size=50_000)
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: tokens are uint16 .* 100000 ids"):
        IndexedDataset(good_pair, vocab_size=100_000)


def test_merge_tool(tmp_path):
    from megatron_lime.data.merge import main as merge_datasets

    a, b = random_documents(5, 1000, seed=3), random_documents(7, 1000, seed=4)
    reference_write(str(tmp_path / "a"), a, 8)
    reference_write(str(tmp_path / "b"), b, 8)
    assert merge_datasets(["--input", str(tmp_path / "a"), str(tmp_path / "b"),
                                             "--output-prefix", str(tmp_path / "out" / "ab")]) == 0
    assert reference_read(str(tmp_path / "out" / "ab")) == a + b
    reference_write(str(tmp_path / "c"), [[1, 2]], 4)  # int32
    assert merge_datasets(["--input", str(tmp_path / "a"), str(tmp_path / "c"),
                                             "--output-prefix", str(tmp_path / "bad")]) == 1
    assert not os.path.exists(tmp_path / "bad.bin") and not os.path.exists(tmp_path / "bad.idx")


def resident_bytes_of_mappings(path: str) -> int:
    """Bytes of `path` resident in this process's mappings (/proc/self/smaps), i.e. counted in its RSS."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                inside = line.rstrip("\n").endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def test_the_token_id_scan_leaves_no_page_of_the_bin_in_the_process(tmp_path):
    """The scan reads the .bin (a 40 GB one at full size); through the memory map every page it touched stayed
    in the process's RSS (19 GiB on rank 0 of the 20B-token corpus). Read in chunks, none is."""
    prefix = str(tmp_path / "scan")
    tokens = np.random.default_rng(0).integers(0, 1000, 24 << 20, dtype=np.uint16)  # 48 MiB, 1.5 chunks
    tokens[-5] = 4321
    with IndexedDatasetWriter(prefix + ".bin", np.uint16) as writer:
        writer.add_documents(tokens, np.full(24 << 10, 1024, dtype=np.int64))
    ds = IndexedDataset(prefix)
    assert ds.token_range() == (0, 4321) and ds.max_token_id() == 4321
    with pytest.raises(IndexedDatasetError, match=r"token id 4321 \(document 24575, token 1019; 1 such ids"):
        ds.check_token_ids(4000)
    assert resident_bytes_of_mappings(ds.bin_path) < (1 << 20)
    assert ds.get(3, 0, 4).tolist() == tokens[3 * 1024:3 * 1024 + 4].tolist()  # the map still serves samples
