"""The one corpus reader: JSONL, JSON, parquet, `datasets` saved to disk, plain text, for pretraining and SFT.

A path is a file, a directory or a glob; `find_inputs` finds its files once, by one suffix list
(INPUT_KINDS), and gives each its kind. `iter_rows` then reads a source's rows as dicts, each with
its RowLocation (file, row, line); `iter_input_rows` does both for a path. SFT preprocessing reads
rows this way and puts its schema adapters (sft/adapters.py) on top; tokenizer training reads the
string values of a few keys (`iter_records`); pretraining preprocessing (preprocess.py) cuts the same
sources into chunks for its worker processes with the pieces below (parse_jsonl_record,
open_parquet, load_saved_dataset), and reads a .json as JSON lines, Megatron's convention.

Every problem with a file or a row is a `BadRecordError` (a LimeInputError: megatron_lime/errors.py)
naming the file, the line or row, and what was wrong. A row that does not parse is yielded as its
BadRecordError in place of the row, so that a caller can skip and count it (--skip-bad-records) or
raise it; a file that cannot be read at all raises. A path that names nothing raises
MissingInputError (also a FileNotFoundError).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from megatron_lime.errors import LimeInputError, MissingInputError

# The one suffix list: the file names each kind of input is found by. "text" (a file is one document)
# only for tokenizer training.
INPUT_KINDS = {
    "jsonl": (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz"),
    "json": (".json", ".json.gz"),  # a JSON array of rows, an object of splits, one object, or JSON lines
    "parquet": (".parquet",),
    "text": (".txt", ".txt.gz"),
}
CORPUS_SUFFIXES = INPUT_KINDS["jsonl"] + INPUT_KINDS["json"] + INPUT_KINDS["parquet"]
# A directory holding one of these was written by `datasets.Dataset.save_to_disk`.
DATASETS_MARKERS = ("state.json", "dataset_dict.json")
# JSON files in dataset directories (a hub snapshot) that describe the data rather than hold it.
METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"})
# Rows per Arrow batch read from parquet and saved datasets.
BATCH_ROWS = 1024


class BadRecordError(LimeInputError):
    """A file or a record that cannot be used: where it is (file; line, row, "file", ...) and what was wrong.

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
    kind: str  # a key of INPUT_KINDS, or "datasets"

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")


@dataclass(frozen=True)
class RowLocation:
    """Where a row is: its file, its 0-based row number, and for JSON lines its 1-based line number."""

    file: str
    row: int
    line: int | None = None

    @property
    def within_file(self) -> str:
        """"line N" or "row N": the location part of a BadRecordError."""
        return f"line {self.line}" if self.line is not None else f"row {self.row}"

    def __str__(self) -> str:
        return f"{self.file}, {self.within_file}"


def file_kind(path: str) -> str | None:
    return next((kind for kind, suffixes in INPUT_KINDS.items() if path.endswith(suffixes)), None)


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in DATASETS_MARKERS)


def _split_pattern(split: str) -> re.Pattern:
    # "train" matches data/train-0000.parquet, train.jsonl, train/part-0.parquet, but not "pretrain.json".
    return re.compile(rf"(^|[/\\_.-]){re.escape(split)}([/\\_.-]|$)")


def find_input_files(pattern: str, suffixes: Sequence[str], split: str | None = None, flag: str = "") -> list[str]:
    """The paths a pattern names, sorted (find_inputs gives them their kinds).

    A file is returned as it is (its type is the caller's to check); a directory written by
    `datasets.save_to_disk` is returned whole; any other directory is searched recursively for
    names ending in `suffixes`, skipping hidden names (e.g. .cache/ of huggingface-cli) and the
    metadata JSON of hub snapshots, and with `split` only the files whose path names that split
    when there are any (`data/train-00000-of-00001.parquet` for "train"); a glob is each of its
    matches (files of the suffixes, or directories as above). Raises MissingInputError naming
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
            raise MissingInputError(f"{flag}{pattern}: no data files ({', '.join(suffixes)}) in this directory")
        return found
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise MissingInputError(f"{flag}{pattern}: no such file, directory or glob match")
    files: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            files += find_input_files(match, suffixes, split, flag)
        elif match.endswith(suffixes):
            files.append(match)
    if not files:
        raise MissingInputError(f"{flag}{pattern}: no data files ({', '.join(suffixes)}) among the matches")
    return files


def find_inputs(pattern: str, split: str | None = None, allow_text: bool = False,
                flag: str = "--input ") -> list[InputSource]:
    """The typed sources a path, directory or glob names (find_input_files); tokenizer training also reads .txt."""
    suffixes = CORPUS_SUFFIXES + (INPUT_KINDS["text"] if allow_text else ())
    sources = []
    for path in find_input_files(pattern, suffixes, split, flag):
        if is_saved_dataset(path):
            sources.append(InputSource(path, "datasets"))
            continue
        kind = file_kind(path)
        if kind is None or (kind == "text" and not allow_text):
            raise BadRecordError(path, None, f"unsupported input type (expected {', '.join(suffixes)}, "
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


def open_parquet(path: str, keys: Sequence[str] = ()):
    """A pyarrow ParquetFile, after checking it opens and has the columns `keys` (BadRecordError otherwise)."""
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


def load_saved_dataset(path: str, split: str | None = None, keys: Sequence[str] = ()) -> tuple[Any, str]:
    """(a `datasets.Dataset` saved to disk, its directory), after checking it has the columns `keys`.

    Of a DatasetDict: the split `split`, else its "train" split, else its only split.
    """
    import datasets

    dataset, directory = datasets.load_from_disk(path), path
    if isinstance(dataset, datasets.DatasetDict):
        if split is not None:
            name = split
        elif "train" in dataset or len(dataset) != 1:
            name = "train"
        else:
            name = next(iter(dataset))  # its only split
        if name not in dataset:
            raise BadRecordError(path, None, f"the saved DatasetDict has no split {name!r} (splits: "
                                             f"{', '.join(dataset)}); name one of them as the split, or read one "
                                             "split's directory")
        dataset, directory = dataset[name], os.path.join(path, name)
    for key in keys:
        if key not in dataset.column_names:
            raise BadRecordError(path, "dataset",
                                 f"missing column {key!r} (columns: {', '.join(dataset.column_names)})")
    return dataset, directory


Row = dict[str, Any] | BadRecordError


def iter_input_rows(pattern: str, split: str | None = None) -> Iterator[tuple[RowLocation, Row]]:
    """Every row of every input a path, directory or glob names (find_inputs, iter_rows)."""
    for source in find_inputs(pattern, split, flag=""):
        yield from iter_rows(source, split)


def iter_rows(source: InputSource, split: str | None = None,
              columns: Sequence[str] | None = None) -> Iterator[tuple[RowLocation, Row]]:
    """Every row of one input with its location, in order; a row that does not parse is its BadRecordError.

    `split` picks the split of a JSON object of splits or a saved DatasetDict; `columns` limits what
    parquet and saved datasets read (and a missing one raises BadRecordError).
    """
    if source.kind == "jsonl":
        yield from _iter_json_lines(source.path)
    elif source.kind == "json":
        yield from _iter_json(source.path, split)
    elif source.kind == "parquet":
        parquet = open_parquet(source.path, columns or ())
        yield from _iter_arrow_rows(parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns), source.path)
    elif source.kind == "datasets":
        dataset, directory = load_saved_dataset(source.path, split, columns or ())
        if columns is not None:
            dataset = dataset.select_columns(list(columns))
        # Arrow batches: far faster than datasets' row-by-row Python conversion on 300k-row sets.
        yield from _iter_arrow_rows(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS), directory)
    else:
        raise BadRecordError(source.path, None, f"{source.kind} inputs have no rows (one document per file)")


def _iter_json_lines(path: str) -> Iterator[tuple[RowLocation, Row]]:
    row = line_number = 0
    try:
        with open_binary(path) as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    record = parse_jsonl_record(line, path, line_number)
                except BadRecordError as e:
                    record = e
                if record is None:  # a blank line
                    continue
                yield RowLocation(path, row, line_number), record
                row += 1
    except GZIP_ERRORS as e:  # a damaged .gz: one bad row stands for the rest of the file
        yield RowLocation(path, row, line_number + 1), BadRecordError(
            path, f"line {line_number + 1}", gzip_error_reason(e) + "; the rest of the file is unread")


def _iter_json(path: str, split: str | None) -> Iterator[tuple[RowLocation, Row]]:
    """A JSON array of rows, an object of splits ({"train": [rows], ...}), one object, or JSON lines named .json."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except GZIP_ERRORS as e:
        raise BadRecordError(path, "file", gzip_error_reason(e)) from None
    try:
        document = json.loads(data)
    except UnicodeDecodeError as e:
        raise BadRecordError(path, f"byte {e.start}", "invalid UTF-8") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and data.lstrip().startswith(b"{"):
            yield from _iter_json_lines(path)  # one object per line, under a .json name
            return
        raise BadRecordError(path, f"line {e.lineno}", f"malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(document, dict):
        splits = {k: v for k, v in document.items()
                  if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        if splits and len(splits) == len(document):  # every value is a list of rows: an object of splits
            if len(splits) == 1:
                document = next(iter(splits.values()))
            elif split in splits:
                document = splits[split]
            else:
                raise BadRecordError(path, None, f"a JSON object of several splits ({', '.join(splits)}); name one "
                                                 f"of them as the split (got {split!r})")
        else:
            document = [document]  # a single row
    if not isinstance(document, list):
        raise BadRecordError(path, None, f"expected a JSON array of rows, got {type(document).__name__}")
    for row, record in enumerate(document):
        location = RowLocation(path, row)
        if isinstance(record, dict):
            yield location, record
        else:
            yield location, BadRecordError(path, location.within_file,
                                           f"expected a JSON object (a row), got {type(record).__name__}")


def _iter_arrow_rows(batches, path: str) -> Iterator[tuple[RowLocation, Row]]:
    """The rows of Arrow record batches (parquet or a saved `datasets` dataset)."""
    row = 0
    try:
        for batch in batches:
            for record in batch.to_pylist():
                yield RowLocation(path, row), record
                row += 1
    except Exception as e:  # a corrupt page part-way through the file: pyarrow raises several types
        raise BadRecordError(path, f"row {row}", f"unreadable data ({type(e).__name__}: {e})") from None


def iter_records(source: InputSource, keys: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """The string values of `keys` of every record of one input, in order; raises BadRecordError on a bad one.

    A "text" input is one document: its whole text, for every key.
    """
    if source.kind == "text":
        try:
            with open_binary(source.path) as f:
                data = f.read()
        except GZIP_ERRORS as e:
            raise BadRecordError(source.path, "file", gzip_error_reason(e)) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecordError(source.path, f"byte {e.start}", "invalid UTF-8") from None
        yield (text,) * len(keys)
        return
    columns = keys if source.kind in ("parquet", "datasets") else None
    for location, row in iter_rows(source, columns=columns):
        if isinstance(row, BadRecordError):
            raise row
        if location.line is not None:
            yield jsonl_values(row, source.path, location.line, keys)
        else:
            yield tuple(check_string_value(row.get(key), location.file, location.row, key) for key in keys)
