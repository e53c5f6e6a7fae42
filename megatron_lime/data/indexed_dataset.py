"""Megatron-LM's indexed dataset format (.bin + .idx), byte for byte: writer and memory-mapped reader.

`PREFIX.bin` holds the tokens of every sequence back to back in one dtype. `PREFIX.idx` (all
little-endian) holds:

    offset  size            field
    0       9               magic b"MMIDIDX\\x00\\x00"
    9       8  uint64       version, always 1
    17      1  uint8        dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    18      8  uint64       S = number of sequences
    26      8  uint64       D = number of entries in document_indices (documents + 1)
    34      4*S int32       sequence_lengths (tokens per sequence)
    34+4S   8*S int64       sequence_pointers (byte offset of each sequence in the .bin)
    34+12S  8*D int64       document_indices: document j is sequences [d[j], d[j+1]); d[0] = 0

We never split documents into sentences, so a sequence is a document and
document_indices = [0, 1, ..., S]. megatron_lime/data/README.md has a worked example.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import struct
from types import TracebackType
from typing import IO

import numpy as np

from megatron_lime.errors import LimeInputError, OutputWriteError
from megatron_lime.files import atomic_write, naming_output

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + two counts 16

DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

# IndexedDataset.fingerprint: .bin files up to this size are hashed whole, larger ones by blocks.
FULL_HASH_BYTES = 64 << 20
FINGERPRINT_BLOCKS = 256
FINGERPRINT_BLOCK_BYTES = 64 << 10

# IndexedDataset._chunks: the token-id scan reads the .bin in pieces of this many tokens (64 MiB of uint16).
SCAN_CHUNK_TOKENS = 32 << 20

# Megatron-LM stores tokens as uint16 when the vocabulary has fewer than 65,500 entries.
UINT16_VOCAB_LIMIT = 65_500


class IndexedDatasetError(LimeInputError):
    """A .bin/.idx pair that cannot be read (missing, truncated, corrupt, wrong dtype)."""


class DatasetWriteError(OutputWriteError):
    """The output of a writer could not be written (read-only or full disk): names the output and the OS reason."""


def best_dtype(vocab_size: int) -> type:
    """Token dtype for a vocabulary: uint16 below 65,500 entries, else int32 (Megatron-LM's rule)."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def dataset_paths(prefix: str) -> tuple[str, str]:
    """(bin_path, idx_path) of a prefix; a path ending in .bin or .idx is taken as its prefix."""
    prefix = strip_extension(prefix)
    return prefix + ".bin", prefix + ".idx"


def strip_extension(path: str) -> str:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class IndexedDatasetWriter:
    """Write a .bin/.idx pair, one document (= one sequence) at a time.

    Tokens stream to a temporary file beside `PREFIX.bin` (megatron_lime.files.atomic_write);
    `finalize()` writes the index the same way and renames both into place, the .idx last, so a
    pair with the final names is always complete. Used as a context manager, an exception
    removes the temporary files instead. An OSError (read-only or full disk) is raised as
    `DatasetWriteError`, which names the output file.
    """

    def __init__(self, prefix_or_bin_path: str, dtype: type | np.dtype = np.uint16):
        self.prefix = strip_extension(prefix_or_bin_path)
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {np.dtype(dtype)} has no code in the indexed dataset format")
        self.itemsize = np.dtype(self.dtype).itemsize
        with naming_output(self.bin_path, DatasetWriteError):
            os.makedirs(os.path.dirname(os.path.abspath(self.bin_path)), exist_ok=True)
            self._bin_writer = atomic_write(self.bin_path, "wb")
            self.bin_file: IO[bytes] = self._bin_writer.__enter__()
        # 4 bytes per document, the only state that grows with the input.
        self.lengths = array.array("i")
        self.num_documents = 0
        self.num_tokens = 0
        self.finalized = False
        self.closed = False

    def add_document(self, ids: np.ndarray | list[int]) -> None:
        """Append one document's token ids."""
        tokens = self._as_tokens(ids)
        self._write(tokens.tobytes(order="C"))
        self.lengths.append(tokens.size)
        self.num_documents += 1
        self.num_tokens += tokens.size

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: `tokens` is their ids back to back, `lengths` their sizes."""
        tokens = self._as_tokens(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._write(tokens.tobytes(order="C"))
        self.lengths.frombytes(lengths.astype(np.int32).tobytes())
        self.num_documents += lengths.size
        self.num_tokens += tokens.size

    def add_index(self, other_prefix: str) -> None:
        """Append every document of another dataset (same dtype), copying its .bin in large blocks."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{other.bin_path}: dtype {np.dtype(other.dtype)} differs from "
                                      f"{np.dtype(self.dtype)}")
        if not np.array_equal(other.document_indices, np.arange(len(other) + 1)):
            raise IndexedDatasetError(f"{other.idx_path}: documents split into sentences (document_indices is not "
                                      "0..n); only one-sequence-per-document datasets can be merged")
        with open(other.bin_path, "rb") as source:
            while block := source.read(64 << 20):
                self._write(block)
        self.lengths.frombytes(np.asarray(other.sequence_lengths, dtype=np.int32).tobytes())
        self.num_documents += len(other)
        self.num_tokens += int(other.sequence_lengths.sum(dtype=np.int64))

    def _write(self, data: bytes) -> None:
        with naming_output(self.bin_path, DatasetWriteError):
            self.bin_file.write(data)

    def _as_tokens(self, ids: np.ndarray | list[int]) -> np.ndarray:
        tokens = np.asarray(ids)
        if tokens.ndim != 1:
            raise ValueError(f"a document must be a 1-d sequence of ids, got shape {tokens.shape}")
        if tokens.dtype != self.dtype:
            if tokens.size and (tokens.min() < np.iinfo(self.dtype).min or tokens.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids {tokens.min()}..{tokens.max()} do not fit {np.dtype(self.dtype)}")
            tokens = tokens.astype(self.dtype)
        return tokens

    def finalize(self) -> None:
        """Write the index and move both files to their final names (the .idx last)."""
        if self.finalized:
            return
        bin_renamed = False
        try:
            with naming_output(self.idx_path, DatasetWriteError), atomic_write(self.idx_path, "wb") as index_file:
                _write_index_to(index_file, self.dtype, np.frombuffer(self.lengths, dtype=np.int32))
                index_file.flush()
                os.fsync(index_file.fileno())  # a full disk fails here, before anything is renamed
                with naming_output(self.bin_path, DatasetWriteError):
                    self.closed = True
                    self._bin_writer.__exit__(None, None, None)  # fsync and rename the .bin
                    bin_renamed = True
        except BaseException:
            self.abort()
            if bin_renamed:  # ours, and without its index it must not stay under the final name
                with contextlib.suppress(OSError):
                    os.unlink(self.bin_path)
            raise
        self.finalized = True

    def abort(self) -> None:
        """Close and delete the temporary files (nothing with the final names is written)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._bin_writer.__exit__(DatasetWriteError, DatasetWriteError(self.bin_path, OSError("aborted")), None)

    def remove_outputs(self) -> None:
        """Delete this writer's finalized pair (after a later step of the same run failed)."""
        if self.finalized:
            for path in (self.idx_path, self.bin_path):  # the .idx first: a lone .bin never looks complete
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self.finalized = False

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


@contextlib.contextmanager
def written_together(writers: list[IndexedDatasetWriter]):
    """`with written_together(writers):` fill pairs that belong together (one per --json-keys key;
    SFT's text and loss mask), appending writers as they are opened; all are finalized or none.

    An exception in the body aborts every writer (temporary files removed). When finalizing
    one fails, the pairs already renamed into place are deleted again (they are this run's),
    so no partial set of outputs looks complete.
    """
    try:
        yield writers
        for writer in writers:
            writer.finalize()
    except BaseException:
        for writer in writers:
            writer.abort()
            writer.remove_outputs()
        raise


def write_index(idx_path: str, dtype: type, sequence_lengths: np.ndarray,
                document_indices: np.ndarray | None = None) -> None:
    """Write a .idx file for sequences of the given lengths (one document per sequence by default)."""
    with atomic_write(idx_path, "wb") as f:
        _write_index_to(f, dtype, sequence_lengths, document_indices)


def _write_index_to(f: IO[bytes], dtype: type, sequence_lengths: np.ndarray,
                    document_indices: np.ndarray | None = None) -> None:
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    if document_indices is None:
        document_indices = np.arange(lengths.size + 1, dtype=np.int64)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    f.write(INDEX_MAGIC)
    f.write(struct.pack("<Q", INDEX_VERSION))
    f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
    f.write(struct.pack("<Q", lengths.size))
    f.write(struct.pack("<Q", document_indices.size))
    f.write(lengths.tobytes(order="C"))
    f.write(pointers.tobytes(order="C"))
    f.write(document_indices.tobytes(order="C"))


class IndexedDataset:
    """Memory-mapped reader of a .bin/.idx pair. Item i is sequence i's tokens (a read-only view).

    The pair is validated on open: magic, version, dtype code, index size, that pointers
    match lengths, and that the .bin is exactly as long as the index says. `vocab_size`,
    when given, is checked against the token dtype (a uint16 file cannot hold a 100k vocabulary).
    """

    def __init__(self, prefix: str, vocab_size: int | None = None):
        self.prefix = strip_extension(prefix)
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: file not found (dataset prefix {self.prefix!r})")
        self._fingerprint: str | None = None
        self._read_index()
        self._check_bin()
        if vocab_size is not None:
            self.check_vocab_size(vocab_size)
        self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.num_tokens else np.zeros(0, self.dtype)

    def _read_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{path}: truncated index: {size} bytes, the header alone is {HEADER_SIZE}")
        if header[:9] != INDEX_MAGIC:
            raise IndexedDatasetError(f"{path}: not a Megatron indexed dataset index "
                                      f"(magic {header[:9]!r}, expected {INDEX_MAGIC!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{path}: index version {version}, only version {INDEX_VERSION} exists")
        code = header[17]
        if code not in CODE_DTYPES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code} (valid codes: {sorted(CODE_DTYPES)})")
        self.dtype = CODE_DTYPES[code]
        self.sequence_count, self.document_count = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * self.sequence_count + 8 * self.document_count
        # Megatron's multimodal datasets append one int8 mode per sequence; accept that too.
        if size not in (expected, expected + self.sequence_count):
            raise IndexedDatasetError(
                f"{path}: index is {size} bytes but its header ({self.sequence_count} sequences, "
                f"{self.document_count} document indices) needs {expected}: truncated or corrupt"
            )
        index = np.memmap(path, dtype=np.uint8, mode="r")
        s, d = self.sequence_count, self.document_count
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=s, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=s, offset=HEADER_SIZE + 4 * s)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=d, offset=HEADER_SIZE + 12 * s)
        if s and (self.sequence_lengths.min() < 0):
            raise IndexedDatasetError(f"{path}: negative sequence length in the index: corrupt")
        if d and (self.document_indices[0] != 0 or self.document_indices[-1] != s
                  or np.any(self.document_indices[1:] < self.document_indices[:-1])):  # no 160 MB diff at 20M
            raise IndexedDatasetError(
                f"{path}: document_indices must rise from 0 to the sequence count {s}; corrupt index"
            )

    def _check_bin(self) -> None:
        itemsize = np.dtype(self.dtype).itemsize
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        if self.sequence_count:
            expected_pointers = np.zeros(self.sequence_count, dtype=np.int64)
            np.cumsum(self.sequence_lengths[:-1].astype(np.int64) * itemsize, out=expected_pointers[1:])
            if not np.array_equal(expected_pointers, self.sequence_pointers):
                raise IndexedDatasetError(f"{self.idx_path}: sequence pointers do not follow the lengths; "
                                          "corrupt index")
        bin_size = os.path.getsize(self.bin_path)
        if bin_size != self.num_tokens * itemsize:
            raise IndexedDatasetError(
                f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} describes {self.num_tokens} tokens of "
                f"{np.dtype(self.dtype)} ({self.num_tokens * itemsize} bytes): truncated, or the pair does not "
                "belong together"
            )

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise if this file's token dtype cannot hold ids of a `vocab_size` vocabulary."""
        if np.issubdtype(self.dtype, np.integer) and vocab_size - 1 > np.iinfo(self.dtype).max:
            raise IndexedDatasetError(
                f"{self.bin_path}: tokens are {np.dtype(self.dtype)} (max id {np.iinfo(self.dtype).max}) but the "
                f"tokenizer has {vocab_size} ids: this data was made with a different tokenizer"
            )

    def fingerprint(self) -> str:
        """A content hash of the pair: the whole .idx, and the .bin (whole up to FULL_HASH_BYTES,
        beyond that its size and FINGERPRINT_BLOCKS evenly spaced blocks).

        Keys index caches: every cached array is a function of the .idx (document lengths), which is
        hashed completely; the .bin part catches a pair re-made with an index that happens to match.
        Computed once per object.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with open(self.idx_path, "rb") as f:
                while block := f.read(16 << 20):
                    digest.update(block)
            bin_size = os.path.getsize(self.bin_path)
            digest.update(struct.pack("<Q", bin_size))
            with open(self.bin_path, "rb") as f:
                if bin_size <= FULL_HASH_BYTES:
                    while block := f.read(16 << 20):
                        digest.update(block)
                else:
                    stride = (bin_size - FINGERPRINT_BLOCK_BYTES) // (FINGERPRINT_BLOCKS - 1)
                    for i in range(FINGERPRINT_BLOCKS):
                        f.seek(i * stride)
                        digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _chunks(self):
        """(first token position, tokens) of the .bin in SCAN_CHUNK_TOKENS pieces, read with read(2) into one
        buffer: nothing of the file stays mapped in this process (a scan through the memory map would leave
        every page of a 40 GB .bin resident in the process's RSS)."""
        buffer = np.empty(min(SCAN_CHUNK_TOKENS, self.num_tokens), dtype=self.dtype)
        raw = memoryview(buffer).cast("B")
        position = 0
        with open(self.bin_path, "rb", buffering=0) as f:
            while position < self.num_tokens:
                want = min(buffer.size, self.num_tokens - position) * buffer.itemsize
                got = 0
                while got < want:
                    n = f.readinto(raw[got:want])
                    if not n:
                        raise IndexedDatasetError(f"{self.bin_path}: ended at byte "
                                                  f"{position * buffer.itemsize + got}, the index describes more")
                    got += n
                yield position, buffer[:want // buffer.itemsize]
                position += want // buffer.itemsize

    def max_token_id(self) -> int:
        """The largest token id in the .bin: one vectorised pass, chunk by chunk (-1 when empty)."""
        return self.token_range()[1]

    def token_range(self) -> tuple[int, int]:
        """(smallest, largest) token id: one pass over the .bin read chunk by chunk (_chunks), vectorised
        min/max per chunk (the smallest is free for unsigned dtypes); (0, -1) when empty."""
        if not self.num_tokens:
            return 0, -1
        signed = np.issubdtype(self.dtype, np.signedinteger)
        smallest, largest = 0, None
        for position, chunk in self._chunks():
            high = int(chunk.max())
            largest = high if largest is None else max(largest, high)
            if signed:
                low = int(chunk.min())
                smallest = low if position == 0 else min(smallest, low)
        return smallest, largest

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise IndexedDatasetError naming the file and the first offending document if an id is outside
        [0, vocab_size)."""
        smallest, largest = self.token_range()
        if smallest >= 0 and largest < vocab_size:
            return
        first, count = None, 0
        for position, chunk in self._chunks():
            bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
            if bad.size and first is None:
                first = (position + int(bad[0]), int(chunk[bad[0]]))
            count += bad.size
        position, value = first
        byte_offset = position * np.dtype(self.dtype).itemsize
        sequence = int(np.searchsorted(self.sequence_pointers, byte_offset, side="right")) - 1
        token = position - int(self.sequence_pointers[sequence]) // np.dtype(self.dtype).itemsize
        raise IndexedDatasetError(
            f"{self.bin_path}: token id {value} (document {sequence}, token {token}; "
            f"{count} such ids in all) is outside the vocabulary of {vocab_size} ids: "
            f"made with another tokenizer, or the model's --vocab-size is too small")

    def __len__(self) -> int:
        return self.sequence_count

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.sequence_count <= i < self.sequence_count:
            raise IndexError(f"sequence {i} out of range for {self.sequence_count} sequences ({self.prefix})")
        return self.get(int(i) % self.sequence_count)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        sequence_length = int(self.sequence_lengths[i])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(f"slice [{offset}, {offset + length}) out of sequence {i} of length {sequence_length}")
        start = int(self.sequence_pointers[i]) // np.dtype(self.dtype).itemsize + offset
        return self._bin[start:start + length]

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={self.sequence_count}, tokens={self.num_tokens}, "
                f"dtype={np.dtype(self.dtype)})")
