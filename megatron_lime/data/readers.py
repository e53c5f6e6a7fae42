"""Streaming readers of raw text corpora: JSONL, JSONL.gz, parquet, `datasets` saved to disk, plain text.

Used by tools/preprocess_data.py (which splits the reading into chunks for worker processes)
and tools/train_tokenizer.py; `find_input_files` and `BadRecordError` are shared with the SFT
readers (sft/readers.py, sft/adapters.py). Every problem with a record raises `BadRecordError`,
which names the file, the line or row, and what was wrong.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from megatron_lime.errors import LimeInputError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".txt.gz")
# A directory holding one of these was written by `datasets.Dataset.save_to_disk`.
DATASETS_MARKERS = ("state.json", "dataset_dict.json")
# JSON files in dataset directories (a hub snapshot) that describe the data rather than hold it.
METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"})


class BadRecordError(LimeInputError):
    """A record that cannot be used: where it is (file; line, row, ...) and what was wrong.

    Code that sees a row without knowing where it came from (the SFT adapters) raises
    `BadRecordError.of_row(reason)`; whoever read the row names the file and row when reporting it.
    """

    def __init__(self, path: str | None, location: str | None, reason: str):
        super().__init__(": ".join(part for part in (path, location, reason) if part is not None))
        self.path, self.location, self.reason = path, location, reason

    @classmethod
    def of_row(cls, reason: str) -> "BadRecordError":
        """A bad row whose file and row the caller adds (the message is the reason alone)."""
        return cls(None, None, reason)

    def __reduce__(self):  # travels from worker processes to the main one
        return type(self), (self.path, self.location, self.reason)


@dataclass(frozen=True)
class InputSource:
    """One input to read: a file, or a directory written by `datasets.save_to_disk`."""

    path: str
    kind: str  # "jsonl", "parquet", "text" or "datasets"

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")


def file_kind(path: str) -> str | None:
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in DATASETS_MARKERS)


def _split_pattern(split: str) -> re.Pattern:
    # "train" matches data/train-0000.parquet, train.jsonl, train/part-0.parquet, but not "pretrain.json".
    return re.compile(rf"(^|[/\\_.-]){re.escape(split)}([/\\_.-]|$)")


def find_input_files(pattern: str, suffixes: Sequence[str], split: str | None = None, flag: str = "") -> list[str]:
    """The inputs a path names, sorted: the one finder of pretraining, tokenizer training and SFT inputs.

    A file is returned as it is (its type is the caller's to check); a directory written by
    `datasets.save_to_disk` is returned whole; any other directory is searched recursively for
    names ending in `suffixes`, skipping hidden names (e.g. .cache/ of huggingface-cli) and the
    metadata JSON of hub snapshots, and with `split` only the files whose path names that split
    when there are any (`data/train-00000-of-00001.parquet` for "train"); a glob is each of its
    matches (files of the suffixes, or directories as above). Raises FileNotFoundError naming
    the path (after `flag`, e.g. "--input ") when nothing is found.
    """
    suffixes = tuple(suffixes)
    if is_saved_dataset(pattern) or os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        found = []
        for root, dirs, names in os.walk(pattern):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, name) for name in names
                      if name.endswith(suffixes) and not name.startswith(".") and name not in METADATA_FILES]
        found.sort()
        if split is not None:
            of_split = [f for f in found if _split_pattern(split).search(os.path.relpath(f, pattern))]
            found = of_split or found
        if not found:
            raise FileNotFoundError(f"{flag}{pattern}: no data files ({', '.join(suffixes)}) in this directory")
        return found
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise FileNotFoundError(f"{flag}{pattern}: no such file, directory or glob match")
    files: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            files += find_input_files(match, suffixes, split, flag)
        elif match.endswith(suffixes):
            files.append(match)
    if not files:
        raise FileNotFoundError(f"{flag}{pattern}: no data files ({', '.join(suffixes)}) among the matches")
    return files


def find_inputs(pattern: str, allow_text: bool = False) -> list[InputSource]:
    """Expand --input (find_input_files) into typed sources; tokenizer training also reads .txt (allow_text)."""
    suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES + (TEXT_SUFFIXES if allow_text else ())
    sources = []
    for path in find_input_files(pattern, suffixes, flag="--input "):
        if is_saved_dataset(path):
            sources.append(InputSource(path, "datasets"))
            continue
        kind = file_kind(path)
        if kind is None or (kind == "text" and not allow_text):
            raise ValueError(f"{path}: unsupported input type (expected {', '.join(suffixes)}, "
                             "or a dataset saved with datasets.save_to_disk)")
        sources.append(InputSource(path, kind))
    return sources


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


# What reading a damaged .gz raises: EOFError (truncated), BadGzipFile (bad header or CRC), zlib.error (bad data).
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def gzip_error_reason(error: BaseException) -> str:
    """One line saying what is wrong with a .gz file, from the exception reading it raised."""
    if isinstance(error, EOFError):
        return "truncated gzip file (the compressed data ends before its end marker)"
    return f"corrupt gzip file ({error})"


def parse_jsonl_line(line: bytes, path: str, line_number: int, keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """The values of `keys` in one JSONL line; None for a blank line. Raises BadRecordError."""
    record = parse_jsonl_record(line, path, line_number)
    return None if record is None else jsonl_values(record, path, line_number, keys)


def parse_jsonl_record(line: bytes, path: str, line_number: int) -> dict | None:
    """One JSONL line as a dict; None for a blank line. Raises BadRecordError."""
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(path, f"line {line_number}", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(path, f"line {line_number}", f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecordError(path, f"line {line_number}", f"expected a JSON object, got {type(record).__name__}")
    return record


def jsonl_values(record: dict, path: str, line_number: int, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The string values of `keys` in a parsed JSONL record. Raises BadRecordError."""
    values = []
    for key in keys:
        if key not in record:
            raise BadRecordError(path, f"line {line_number}",
                                 f"missing key {key!r} (keys: {', '.join(list(record)[:10])})")
        value = record[key]
        if not isinstance(value, str):
            raise BadRecordError(path, f"line {line_number}",
                                 f"key {key!r} is {type(value).__name__}, expected a string")
        values.append(value)
    return tuple(values)


def check_string_value(value: object, path: str, row: int, key: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise BadRecordError(path, f"row {row}", f"column {key!r} is {kind}, expected a string")
    return value


def open_parquet(path: str, keys: tuple[str, ...]):
    """A pyarrow ParquetFile, after checking it opens and has the columns (BadRecordError otherwise)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise BadRecordError(path, "file", f"unreadable parquet file ({type(e).__name__}: {e})") from None
    columns = parquet.schema_arrow.names
    for key in keys:
        if key not in columns:
            raise BadRecordError(path, "file", f"missing column {key!r} (columns: {', '.join(columns)})")
    return parquet


def load_saved_dataset(path: str, keys: tuple[str, ...]):
    """A `datasets.Dataset` saved to disk (a DatasetDict must have a single split, or a 'train' split)."""
    import datasets

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise ValueError(f"{path}: a DatasetDict with splits {list(dataset)}; "
                             "point --input at one split's directory")
    for key in keys:
        if key not in dataset.column_names:
            raise BadRecordError(path, "dataset",
                                 f"missing column {key!r} (columns: {', '.join(dataset.column_names)})")
    return dataset


def iter_records(source: InputSource, keys: tuple[str, ...], batch_size: int = 1024) -> Iterator[tuple[str, ...]]:
    """Yield the `keys` values of every record of one input, one tuple per record (in order)."""
    if source.kind == "jsonl":
        line_number = 0
        try:
            with open_binary(source.path) as f:
                for line_number, line in enumerate(f, start=1):
                    values = parse_jsonl_line(line, source.path, line_number, keys)
                    if values is not None:
                        yield values
        except GZIP_ERRORS as e:
            raise BadRecordError(source.path, f"line {line_number + 1}", gzip_error_reason(e)) from None
    elif source.kind == "text":
        # A plain-text file is one document (the tokenizer trainer only).
        try:
            with open_binary(source.path) as f:
                data = f.read()
        except GZIP_ERRORS as e:
            raise BadRecordError(source.path, "file", gzip_error_reason(e)) from None
        try:
            yield (data.decode("utf-8"),) * len(keys)
        except UnicodeDecodeError as e:
            raise BadRecordError(source.path, f"byte {e.start}", "invalid UTF-8") from None
    elif source.kind == "parquet":
        parquet = open_parquet(source.path, keys)
        yield from _iter_arrow_batches(parquet.iter_batches(batch_size=batch_size, columns=list(keys)),
                                       source.path, keys)
    elif source.kind == "datasets":
        dataset = load_saved_dataset(source.path, keys)
        yield from _iter_arrow_batches(dataset.with_format("arrow").iter(batch_size=batch_size), source.path, keys)
    else:
        raise ValueError(f"unknown input kind {source.kind!r}")


def _iter_arrow_batches(batches, path: str, keys: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Rows of Arrow record batches (parquet or a saved `datasets` dataset), each value checked to be a string."""
    row = 0
    for batch in batches:
        columns = [batch.column(k).to_pylist() for k in keys]
        for i, values in enumerate(zip(*columns)):
            for key, value in zip(keys, values):
                check_string_value(value, path, row + i, key)
            yield values
        row += batch.num_rows
