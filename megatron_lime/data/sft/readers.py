"""Read the rows of a dataset as users download it: parquet, JSONL, JSON, or `datasets` saved to disk.

A path is a file, a directory or a glob, found by the one input finder (readers.find_input_files,
shared with pretraining). A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
is loaded with `datasets.load_from_disk`; any other directory (a hub snapshot, say) is searched
recursively for data files, and when a split is named only the files whose path names that split
are read (`data/train-00000-of-00001.parquet` for split "train"), as the hub lays them out.

Every row comes with its location (file and row number) so errors can name it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from megatron_lime.data.readers import GZIP_ERRORS, find_input_files, gzip_error_reason
from megatron_lime.errors import LimeInputError

DATA_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass(frozen=True)
class RowLocation:
    file: str
    row: int  # 0-based row number within the file (for JSON lines: line number - 1)
    line: int | None = None  # 1-based line number, for JSON lines

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}" if self.line is not None else f"{self.file}, row {self.row}"


class DataFileError(LimeInputError):
    """A data file that cannot be read at all (not one bad row)."""


def _open_text(path: str):
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_rows(path: str, split: str | None = None) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    """Every row of every file `path` names, with its location."""
    for file in find_input_files(path, DATA_SUFFIXES, split):
        yield from iter_file_rows(file, split)


def iter_file_rows(file: str, split: str | None = None) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    if os.path.isdir(file):
        yield from _iter_saved_dataset(file, split)
    elif file.endswith(".parquet"):
        yield from _iter_parquet(file)
    elif file.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_json_lines(file)
    elif file.endswith((".json", ".json.gz")):
        yield from _iter_json(file, split)
    else:
        raise DataFileError(f"{file}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)}, "
                            "or a directory written by datasets' save_to_disk)")


def _iter_parquet(file: str) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataFileError(f"{file}: not a readable parquet file ({e})") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield RowLocation(file, row), record
            row += 1


def _iter_json_lines(file: str) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    row = line_number = 0
    try:
        with _open_text(file) as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                location = RowLocation(file, row, line_number)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield location, _Unreadable(f"invalid JSON: {e.msg} at column {e.colno}")
                else:
                    yield location, record
                row += 1
    except GZIP_ERRORS as e:  # a damaged .gz: one bad row stands for the rest of the file
        reason = gzip_error_reason(e) + "; the rest of the file is unread"
        yield RowLocation(file, row, line_number + 1), _Unreadable(reason)


def _iter_json(file: str, split: str | None = None) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    """A JSON array of rows, an object of splits ({"train": [rows], ...}), one object, or JSON lines named .json."""
    try:
        with _open_text(file) as f:
            text = f.read()
    except GZIP_ERRORS as e:
        yield RowLocation(file, 0), _Unreadable(gzip_error_reason(e) + "; the file is unread")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _iter_json_lines(file)  # one object per line, under a .json name
            return
        raise DataFileError(f"{file}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if isinstance(data, dict):
        splits = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        if splits and len(splits) == len(data):  # every value is a list of rows: an object of splits
            if len(splits) == 1:
                data = next(iter(splits.values()))
            elif split in splits:
                data = splits[split]
            else:
                raise DataFileError(f"{file}: a JSON object of several splits ({', '.join(splits)}); name one of "
                                    f"them as the split (got {split!r})")
        else:
            data = [data]  # a single row
    if not isinstance(data, list):
        raise DataFileError(f"{file}: expected a JSON array of rows, got {type(data).__name__}")
    for row, record in enumerate(data):
        yield RowLocation(file, row), record


def _iter_saved_dataset(directory: str, split: str | None) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    import datasets

    loaded = datasets.load_from_disk(directory)
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataFileError(f"{directory}: the saved DatasetDict has no split {name!r} "
                                f"(splits: {', '.join(loaded)})")
        loaded = loaded[name]
        directory = os.path.join(directory, name)
    row = 0
    # Arrow batches: far faster than datasets' row-by-row Python conversion on 300k-row sets.
    for table in loaded.with_format("arrow").iter(batch_size=1024):
        for record in table.to_pylist():
            yield RowLocation(directory, row), record
            row += 1


class _Unreadable(dict):
    """Stands in for a JSON line that does not parse, so the caller reports it as a bad row."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


def unreadable_reason(record: Any) -> str | None:
    """Why a yielded row could not be read, or None for a real row."""
    if isinstance(record, _Unreadable):
        return record.reason
    if not isinstance(record, dict):
        return f"expected a JSON object (a row), got {type(record).__name__}"
    return None
