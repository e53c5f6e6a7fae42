"""Tokenize a corpus into Megatron-LM indexed datasets (PREFIX_{key}_document.bin / .idx).

The command line is tools/preprocess_data.py (a thin wrapper around `main`):

    python tools/preprocess_data.py --input 'fineweb-edu/CC-MAIN-2025-05/*.parquet' \
        --json-keys text --tokenizer-model tokenizers/lime-50k --append-eod \
        --output-prefix data/fineweb_edu --workers 8

Same flags and meaning as Megatron-LM's tools/preprocess_data.py; the tokenizer flags
(--tokenizer-type, --tokenizer-model, --vocab-file, --merge-file) are megatron_lime.tokenizer's,
shared by every tool, and a tokenizer that could not be exported is refused here, first.
Input: JSONL, JSONL.gz or parquet files, a directory or glob of them, or a `datasets` dataset
saved to disk.

Filters (`--filter "int_score >= 3" --filter "language == 'en'"`, any column of the input;
the language is megatron_lime/data/filters.py) keep a record when all hold; the summary gives
each filter's kept and dropped counts. `--num-shards N --shard-index I` processes a
contiguous, size-balanced share of the sorted input files (megatron_lime/data/shards.py) into
OUTPUT_PREFIX_shard0000I-of-0000N_{key}_document; tools/merge_datasets.py on the shards, in
name order, gives the bytes of one run over every input.

How it runs: the main process only hands out work and writes tokens. For parquet files it
reads only the footer and hands each worker whole row groups, which the worker reads itself,
so several files (or row groups) are read at once; for JSONL it only finds line ends, and the
workers read their byte ranges of a plain file themselves (a .gz is decompressed here and its
bytes sent). Workers parse, filter, validate and tokenize, and send back numpy arrays (packed by
the C++ helper). At most 2 x --workers chunks are in flight and results are written in input
order, so memory stays flat however large the input is. Output goes to temporary names and is
renamed at the end: after an error no .bin/.idx with the final name exists.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from megatron_lime.data.filters import FilterValueError, RecordFilters
from megatron_lime.native import compiled_helpers
from megatron_lime.data.indexed_dataset import IndexedDatasetWriter, best_dtype, written_together
from megatron_lime.data.readers import (GZIP_ERRORS, BadRecordError, InputSource, check_string_value, find_inputs,
                                        gzip_error_reason, jsonl_values, load_saved_dataset, open_binary, open_parquet,
                                        parse_jsonl_record)
from megatron_lime.data.shards import shard_inputs, shard_suffix
from megatron_lime.errors import LimeInputError, reports_input_errors
from megatron_lime.tokenizer import LimeTokenizer, TokenizerSpec, add_tokenizer_args, build_tokenizer

# Bytes of JSONL (or rows of parquet) per worker task: big enough to amortise the
# inter-process hop, small enough that 2 x workers of them in flight stay a few MB.
CHUNK_BYTES = 1 << 20
# Over the input's last few MB the chunks shrink to this, so that the workers finish together:
# a 1 MB chunk is about 0.1 s of one core, which the other workers would spend idle at the end.
MIN_CHUNK_BYTES = 64 << 10
CHUNK_ROWS = 512
# Parquet row groups up to this many rows are read by the workers themselves (a few MB of
# text each; `datasets` writes 1,000-row groups). Larger ones (pandas writes one group per
# file) are streamed by the main process in CHUNK_ROWS batches instead, to bound memory.
MAX_WORKER_ROW_GROUP_ROWS = 16 * CHUNK_ROWS
# How many bad records are printed in full with --skip-bad-records (all are counted).
MAX_BAD_RECORDS_SHOWN = 20
# Read as JSON lines, in byte ranges: a .json too (Megatron's convention; SFT's reader also takes JSON arrays).
JSON_LINES_KINDS = ("jsonl", "json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="JSONL / JSONL.gz / parquet file, directory or glob, or a saved `datasets` dataset.")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Fields (columns) to tokenize; one output dataset per key.")
    group.add_argument("--filter", dest="filters", action="append", default=[], metavar="EXPR",
                       help="Keep only records where EXPR holds, e.g. \"int_score >= 3\" or \"language in ['en']\" "
                            "(repeatable: all must hold). Columns, literals, == != < <= > >=, in / not in [...], "
                            "and/or/not; never Python eval. Kept/dropped counts per filter are in the summary.")
    group.add_argument("--split-sentences", action="store_true",
                       help="Not supported (documents are never split); kept so Megatron command lines fail loudly.")
    group = add_tokenizer_args(parser)
    group.add_argument("--append-eod", action="store_true",
                       help="Append the <eos> id to every document (separates documents in packed samples).")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="Writes OUTPUT_PREFIX_{key}_document.bin/.idx.")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"],
                       help="Megatron's only format (accepted for compatibility).")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="Tokenizer worker processes.")
    group.add_argument("--num-shards", type=int, default=1,
                       help="Split the sorted input files into N contiguous, size-balanced shares "
                            "(one per job of a cluster array).")
    group.add_argument("--shard-index", type=int, default=0,
                       help="Which share this run processes (0..N-1); the output prefix gets _shardIIIII-of-NNNNN.")
    group.add_argument("--partitions", type=int, default=1,
                       help="Accepted for compatibility; only 1 is supported (workers already parallelise).")
    group.add_argument("--log-interval", type=int, default=10_000, help="Documents between progress updates.")
    group.add_argument("--skip-bad-records", action="store_true",
                       help="Skip malformed records and unreadable (e.g. truncated .gz) files, counted and reported, "
                            "instead of stopping.")
    group.add_argument("--allow-empty", action="store_true",
                       help="Write an empty dataset when the input has no documents "
                            "(default: exit 1 with 'no documents').")
    group.add_argument("--quiet", action="store_true", help="No progress bar (the summary is still printed).")
    args = parser.parse_args(argv)
    if args.split_sentences:
        parser.error("--split-sentences is not supported: LIME trains on whole documents")
    if args.partitions != 1:
        parser.error("--partitions other than 1 is not supported; use --workers")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in 0..{args.num_shards - 1} and --num-shards at least 1")
    return args


# ---------------------------------------------------------------------------------------
# Work units. The main process makes them; workers turn them into tokens.


class NoDocumentsError(LimeInputError):
    """The input held no documents (and --allow-empty was not given)."""


@dataclass
class Chunk:
    """A slice of one input: raw JSONL bytes (whole lines), parquet row groups to read, or an Arrow table."""

    path: str
    first_record: int  # line number (JSONL, 1-based) or row number (parquet / datasets, 0-based)
    jsonl_bytes: bytes | None = None  # .jsonl.gz: the decompressed lines
    jsonl_range: tuple[int, int] | None = None  # plain JSONL: [start, end) bytes of whole lines, read by the worker
    row_groups: list[int] | None = None  # parquet: the worker reads these itself
    table: object | None = None  # pyarrow.RecordBatch or Table
    bad_file_reason: str | None = None  # the whole file could not be read


@dataclass
class ChunkResult:
    tokens: list[np.ndarray]  # per key: ids of the chunk's documents back to back
    lengths: list[np.ndarray]  # per key: tokens per document
    num_documents: int = 0
    num_empty: int = 0
    num_blank: int = 0  # blank JSONL lines
    num_bytes: int = 0
    bad_records: list[str] = field(default_factory=list)
    num_bad: int = 0
    filter_counts: list[tuple[int, int]] = field(default_factory=list)  # (seen, kept) per --filter


def columns_to_read(keys: tuple[str, ...], filters: RecordFilters) -> list[str]:
    """The columns a table input must read: the keys to tokenize and the filters' columns."""
    return list(dict.fromkeys(keys + filters.columns))


def iter_chunks(sources: list[InputSource], keys: tuple[str, ...], filters: RecordFilters, skip_bad: bool,
                workers: int = 1) -> Iterator[Chunk]:
    columns = columns_to_read(keys, filters)
    # Plain JSONL bytes still to read after each source: the chunk size shrinks over the last few MB.
    plain_sizes = [os.path.getsize(s.path) if s.kind in JSON_LINES_KINDS and not s.compressed else 0 for s in sources]
    after = list(itertools.accumulate(reversed(plain_sizes[1:]), initial=0))[::-1]  # one pass: thousands of files
    for source, bytes_after in zip(sources, after):
        if source.kind in JSON_LINES_KINDS:
            yield from jsonl_chunks(source.path, skip_bad, None if source.compressed else (bytes_after, workers))
        elif source.kind == "parquet":
            try:
                yield from parquet_chunks(source.path, keys, filters)
            except BadRecordError as e:
                if not skip_bad:
                    raise
                yield Chunk(source.path, 0, bad_file_reason=str(e))
            except Exception as e:  # a corrupt page part-way through the file
                if not skip_bad:
                    raise BadRecordError(source.path, "file",
                                         f"unreadable parquet data ({type(e).__name__}: {e})") from None
                yield Chunk(source.path, 0, bad_file_reason=f"{source.path}: unreadable parquet data ({e})")
        elif source.kind == "datasets":
            dataset, _ = load_saved_dataset(source.path, keys=keys)
            check_filter_columns(source.path, "dataset", dataset.column_names, filters)
            row = 0
            for table in dataset.with_format("arrow").iter(batch_size=CHUNK_ROWS):
                yield Chunk(source.path, row, table=table.select(columns))
                row += table.num_rows


def check_filter_columns(path: str, location: str, available: list[str], filters: RecordFilters) -> None:
    for f in filters.filters:
        for column in f.columns:
            if column not in available:
                raise BadRecordError(path, location, f"--filter {f.expression!r}: no column {column!r} "
                                                     f"(columns: {', '.join(available)})")


def parquet_chunks(path: str, keys: tuple[str, ...], filters: RecordFilters) -> Iterator[Chunk]:
    """Runs of whole row groups (about CHUNK_ROWS rows) for the workers to read; the main process reads the footer."""
    parquet = open_parquet(path, keys)
    check_filter_columns(path, "file", parquet.schema_arrow.names, filters)
    columns = columns_to_read(keys, filters)
    metadata = parquet.metadata
    group: list[int] = []
    group_first = row = 0
    for i in range(metadata.num_row_groups):
        rows = metadata.row_group(i).num_rows
        if rows > MAX_WORKER_ROW_GROUP_ROWS:
            if group:
                yield Chunk(path, group_first, row_groups=group)
                group = []
            for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, row_groups=[i], columns=columns):
                yield Chunk(path, row, table=batch)
                row += batch.num_rows
            group_first = row
            continue
        if not group:
            group_first = row
        group.append(i)
        row += rows
        if row - group_first >= CHUNK_ROWS:
            yield Chunk(path, group_first, row_groups=group)
            group = []
    if group:
        yield Chunk(path, group_first, row_groups=group)


def jsonl_chunks(path: str, skip_bad: bool = False, tail: tuple[int, int] | None = None) -> Iterator[Chunk]:
    """~CHUNK_BYTES blocks of whole lines; the main process never parses JSON.

    A plain file's chunks are byte ranges: the main process only finds line ends and counts lines
    (for error messages), and each worker reads its range itself, so the text does not go through
    a pipe twice. A .gz is read (decompressed) here and its chunks carry the bytes.
    tail=(bytes of input after this file, workers), for a plain file: the blocks shrink towards
    MIN_CHUNK_BYTES once less than 2 x workers x CHUNK_BYTES of input is left, so no worker is
    left with a last full-size chunk while the others idle.
    A damaged .gz raises BadRecordError naming the file and the line where reading stopped;
    with skip_bad the lines before it are kept and the rest of the file counts as one bad record.
    """
    plain = not path.endswith(".gz")
    line_number, position = 1, 0  # position: the file offset of `remainder` (plain files)
    bytes_left = os.path.getsize(path) + tail[0] if tail else 0

    def chunk(lines: bytes) -> Chunk:
        return Chunk(path, line_number, jsonl_range=(position, position + len(lines))) if plain else \
            Chunk(path, line_number, jsonl_bytes=lines)

    with open_binary(path) as f:
        remainder = b""
        while True:
            size = max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, bytes_left // (2 * tail[1]))) if tail else CHUNK_BYTES
            try:
                block = f.read(size)
                bytes_left -= len(block)
            except GZIP_ERRORS as e:
                error = BadRecordError(path, f"line {line_number}",
                                       gzip_error_reason(e) + "; the rest of the file is unread")
                if not skip_bad:
                    raise error from None
                yield Chunk(path, line_number, bad_file_reason=str(error))
                return
            if not block:
                break
            block = remainder + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                remainder = block
                continue
            remainder = block[cut:]
            yield chunk(block[:cut])
            line_number += block.count(b"\n", 0, cut)
            position += cut
        if remainder:
            yield chunk(remainder)


# Worker state, set once per process by init_worker.
WORKER: dict[str, object] = {}


def init_worker(tokenizer: LimeTokenizer | TokenizerSpec, keys: tuple[str, ...], append_eod: bool, skip_bad: bool,
                filter_expressions: tuple[str, ...] = ()) -> None:
    # One process per core already: a Hugging Face tokenizer must not start its own thread pool too.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if isinstance(tokenizer, TokenizerSpec):
        tokenizer = build_tokenizer(tokenizer, check=False)  # the main process checked it
    filters = RecordFilters(filter_expressions)
    WORKER.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod, skip_bad=skip_bad,
                  dtype=best_dtype(tokenizer.vocab_size), filters=filters,
                  columns=columns_to_read(keys, filters))


def read_jsonl_range(path: str, start: int, end: int) -> bytes:
    """The worker's own read of a plain JSONL chunk (the file handle is kept for the next chunk of the same file)."""
    cached = WORKER.get("jsonl")
    if cached is None or cached[0] != path:
        if cached is not None:
            cached[1].close()
        WORKER["jsonl"] = cached = (path, open(path, "rb"))
    cached[1].seek(start)
    return cached[1].read(end - start)


def read_row_groups(path: str, row_groups: list[int], columns: list[str]):
    """The worker's own read of parquet row groups (the file handle is kept for the next chunk of the same file)."""
    import pyarrow.parquet as pq

    cached = WORKER.get("parquet")
    if cached is None or cached[0] != path:
        WORKER["parquet"] = cached = (path, pq.ParquetFile(path))
    return cached[1].read_row_groups(row_groups, columns=columns, use_threads=False)


def passes_filters(filters: RecordFilters, record: dict, path: str, location: str) -> bool:
    """Whether `record` passes every --filter; a value a filter cannot compare is a bad record at `location`."""
    try:
        return not filters or filters.keep(record)
    except FilterValueError as e:
        raise BadRecordError(path, location, str(e)) from None


def jsonl_documents(chunk: Chunk, keys: tuple[str, ...], filters: RecordFilters,
                    result: ChunkResult) -> Iterator[list[str] | BadRecordError]:
    """The text values of each kept JSONL record of the chunk, or the BadRecordError of a bad one."""
    data = chunk.jsonl_bytes if chunk.jsonl_bytes is not None else read_jsonl_range(chunk.path, *chunk.jsonl_range)
    result.num_bytes = len(data)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the empty piece after the final newline is not a line
    for i, line in enumerate(lines):
        line_number = chunk.first_record + i
        try:
            record = parse_jsonl_record(line, chunk.path, line_number)
            if record is None:
                result.num_blank += 1
            elif passes_filters(filters, record, chunk.path, f"line {line_number}"):
                yield jsonl_values(record, chunk.path, line_number, keys)
        except BadRecordError as e:
            yield e


def parquet_documents(chunk: Chunk, keys: tuple[str, ...], filters: RecordFilters,
                      result: ChunkResult) -> Iterator[list[str] | BadRecordError]:
    """The text values of each kept parquet row of the chunk, or the BadRecordError of a bad one."""
    if chunk.row_groups is not None:
        try:
            table = read_row_groups(chunk.path, chunk.row_groups, WORKER["columns"])  # type: ignore[arg-type]
        except Exception as e:  # a corrupt page
            yield BadRecordError(chunk.path, f"row groups {chunk.row_groups[0]}-{chunk.row_groups[-1]}",
                                 f"unreadable parquet data ({type(e).__name__}: {e})")
            return
    else:
        table = chunk.table
    raw = [table.column(k).to_pylist() for k in keys]
    filter_columns = {c: table.column(c).to_pylist() for c in filters.columns}
    for i in range(table.num_rows):
        row = chunk.first_record + i
        try:
            values_of_row = {c: column[i] for c, column in filter_columns.items()}
            if passes_filters(filters, values_of_row, chunk.path, f"row {row}"):
                values = [check_string_value(col[i], chunk.path, row, k) for col, k in zip(raw, keys)]
                result.num_bytes += sum(len(v) for v in values)  # characters; close to bytes for English
                yield values
        except BadRecordError as e:
            yield e


def encode_chunk(chunk: Chunk) -> ChunkResult | BadRecordError:
    """Parse, filter, validate and tokenize one chunk (without --skip-bad-records, a bad record is returned)."""
    tokenizer: LimeTokenizer = WORKER["tokenizer"]  # type: ignore[assignment]
    keys: tuple[str, ...] = WORKER["keys"]  # type: ignore[assignment]
    filters: RecordFilters = WORKER["filters"]  # type: ignore[assignment]
    result = ChunkResult(tokens=[], lengths=[])
    if chunk.bad_file_reason is not None:
        result.num_bad, result.bad_records = 1, [chunk.bad_file_reason]
        return result
    columns: list[list[str]] = [[] for _ in keys]
    is_jsonl = chunk.jsonl_bytes is not None or chunk.jsonl_range is not None
    documents = jsonl_documents if is_jsonl else parquet_documents
    for values in documents(chunk, keys, filters, result):
        if isinstance(values, BadRecordError):
            if not WORKER["skip_bad"]:
                return values
            result.num_bad += 1
            if len(result.bad_records) < MAX_BAD_RECORDS_SHOWN:
                result.bad_records.append(str(values))
            continue
        for column, value in zip(columns, values):
            column.append(value)

    result.num_documents = len(columns[0])
    result.filter_counts = filters.take_counts()
    eod = tokenizer.eos_id if WORKER["append_eod"] else None
    for column in columns:
        encoded = tokenizer.encode_batch(column)
        tokens, lengths, num_empty = pack_documents(encoded, eod, WORKER["dtype"])  # type: ignore[arg-type]
        result.num_empty += num_empty
        result.tokens.append(tokens)
        result.lengths.append(lengths)
    return result


def pack_documents(encoded: list[list[int]], eod: int | None, dtype: type) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids back to back, length of each document, number of empty documents dropped), eod appended to each.

    The compiled helper (csrc/data/helpers.cpp): besides tokenizing, this is most of a worker's work.
    """
    pack = compiled_helpers().pack_documents_uint16 if dtype == np.uint16 else compiled_helpers().pack_documents_int32
    return pack(encoded, -1 if eod is None else eod)


def pack_documents_reference(encoded: list[list[int]], eod: int | None,
                             dtype: type) -> tuple[np.ndarray, np.ndarray, int]:
    """pack_documents in numpy (its reference in the tests; about 6x slower)."""
    kept = [ids for ids in encoded if ids]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    flat = np.fromiter(itertools.chain.from_iterable(kept), dtype=dtype, count=int(lengths.sum()))
    if eod is None:
        return flat, lengths.astype(np.int32), len(encoded) - len(kept)
    lengths += 1
    ends = np.cumsum(lengths) - 1  # where each document's eod goes
    tokens = np.empty(flat.size + len(kept), dtype=dtype)
    is_text = np.ones(tokens.size, dtype=bool)
    is_text[ends] = False
    tokens[is_text] = flat
    tokens[ends] = eod
    return tokens, lengths.astype(np.int32), len(encoded) - len(kept)


# ---------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar showing docs/s, tokens/s and MB/s (or nothing with --quiet)."""

    def __init__(self, quiet: bool, log_interval: int):
        self.start = time.perf_counter()
        self.documents = self.tokens = self.bytes = 0
        self.log_interval = log_interval
        self.next_update = log_interval
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", unit_scale=True, dynamic_ncols=True, desc="tokenizing", mininterval=0.5)

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        if self.bar is not None:
            self.bar.update(documents)
            if self.documents >= self.next_update:
                self.next_update = self.documents + self.log_interval
                elapsed = max(time.perf_counter() - self.start, 1e-9)
                rates = f"{self.tokens / elapsed / 1e3:,.0f}k tok/s, {self.bytes / elapsed / 1e6:.1f} MB/s"
                self.bar.set_postfix_str(rates, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_prefix(args: argparse.Namespace) -> str:
    """--output-prefix, with the shard's suffix when --num-shards is more than 1."""
    if args.num_shards > 1:
        return args.output_prefix + shard_suffix(args.num_shards, args.shard_index)
    return args.output_prefix


def run(args: argparse.Namespace) -> dict:
    """Tokenize everything; returns the summary. Raises BadRecordError on the first bad record (unless skipping)."""
    start = time.perf_counter()
    keys = tuple(args.json_keys)
    filters = RecordFilters(args.filters)  # a bad expression stops here, before anything is written
    sources = [s for pattern in args.input.split(",") for s in find_inputs(pattern)]
    if args.num_shards > 1:
        everything = sources
        sources = shard_inputs(everything, args.num_shards, args.shard_index)
        names = f" ({sources[0].path} .. {sources[-1].path})" if sources else ""
        print(f"shard {args.shard_index} of {args.num_shards}: {len(sources)} of {len(everything)} inputs{names}",
              flush=True)
    # The export check (~0.1 s for a 32k vocabulary) runs once the workers have their first chunks,
    # not before them; an unsupported tokenizer still stops the run before any output gets its name.
    tokenizer = build_tokenizer(TokenizerSpec.from_args(args), check=False)
    export_checked = False
    dtype = best_dtype(tokenizer.vocab_size)
    prefix = output_prefix(args)
    writers: list[IndexedDatasetWriter] = []
    summary = {"documents": 0, "tokens": 0, "empty_skipped": 0, "blank_lines": 0, "bad_records": 0, "bytes": 0,
               "filters": filters}
    bad_shown: list[str] = []
    progress = Progress(args.quiet, args.log_interval)
    max_in_flight = 2 * args.workers
    # fork: workers start in milliseconds (spawn would re-import numpy/sentencepiece in each), and
    # inherit the loaded tokenizer (fork passes initargs without pickling) instead of loading it again.
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context("fork"), initializer=init_worker,
        initargs=(tokenizer, keys, args.append_eod, args.skip_bad_records, tuple(args.filters)))
    pending: collections.deque[concurrent.futures.Future] = collections.deque()

    def collect() -> None:
        result = pending.popleft().result()
        if isinstance(result, BadRecordError):
            raise result
        for writer, tokens, lengths in zip(writers, result.tokens, result.lengths):
            writer.add_documents(tokens, lengths)
        num_tokens = sum(t.size for t in result.tokens)
        summary["documents"] += result.num_documents
        summary["tokens"] += num_tokens
        summary["empty_skipped"] += result.num_empty
        summary["blank_lines"] += result.num_blank
        summary["bad_records"] += result.num_bad
        summary["bytes"] += result.num_bytes
        filters.add_counts(result.filter_counts)
        for message in result.bad_records:
            if len(bad_shown) < MAX_BAD_RECORDS_SHOWN:
                bad_shown.append(message)
                print(f"warning: skipped bad record: {message}", file=sys.stderr)
        progress.update(result.num_documents, num_tokens, result.num_bytes)

    try:
        with written_together(writers):
            for key in keys:
                writers.append(IndexedDatasetWriter(f"{prefix}_{key}_document", dtype))
            for chunk in iter_chunks(sources, keys, filters, args.skip_bad_records, args.workers):
                pending.append(pool.submit(encode_chunk, chunk))
                if len(pending) >= max_in_flight:
                    if not export_checked:
                        tokenizer.check_exportable()
                        export_checked = True
                    collect()
            if not export_checked:
                tokenizer.check_exportable()
            while pending:
                collect()
            # A share with no files (more shards than files) is empty by design: the merge needs its pair.
            if writers[0].num_documents == 0 and not (args.allow_empty or (args.num_shards > 1 and not sources)):
                raise NoDocumentsError(
                    f"--input {args.input}: no documents ({summary['documents']:,} records, "
                    f"{summary['empty_skipped']:,} of them empty, {summary['blank_lines']:,} blank lines, "
                    f"{summary['bad_records']:,} bad records skipped); nothing written "
                    f"(pass --allow-empty to write an empty dataset)")
    finally:
        # On error: queued chunks are cancelled, the few running ones finish (milliseconds).
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    summary["seconds"] = time.perf_counter() - start
    return summary


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status. Bad input is one line naming the file, exit 1 (errors.py)."""
    args = parse_args(argv)
    try:
        summary = run(args)
    except BadRecordError as e:
        raise BadRecordError(e.path, e.location, f"{e.reason} (no output written; pass --skip-bad-records to skip "
                                                 "such records)") from None
    seconds = summary["seconds"]
    outputs = ", ".join(f"{output_prefix(args)}_{k}_document.{{bin,idx}}" for k in args.json_keys)
    filters: RecordFilters = summary["filters"]
    dropped = sum(dropped for _, _, dropped in filters.counts())
    if filters:
        print(f"filters ({dropped:,} records dropped):\n{filters.summary()}")
    print(
        f"done: {summary['documents']:,} documents, {summary['tokens']:,} tokens, "
        f"{summary['empty_skipped']:,} empty documents skipped, {summary['blank_lines']:,} blank lines skipped, "
        f"{summary['bad_records']:,} bad records skipped, "
        + (f"{dropped:,} filtered out, " if filters else "")
        + f"{seconds:.1f} s ({summary['documents'] / seconds:,.0f} docs/s, "
        f"{summary['tokens'] / seconds:,.0f} tokens/s, {summary['bytes'] / seconds / 1e6:.1f} MB/s) -> {outputs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
