#!/usr/bin/env python
"""Tokenize a corpus into Megatron-LM indexed datasets (PREFIX_{key}_document.bin / .idx).

    python tools/preprocess_data.py --input 'fineweb-edu/CC-MAIN-2025-05/*.parquet' \
        --json-keys text --tokenizer-model tokenizers/lime-50k --append-eod \
        --output-prefix data/fineweb_edu --workers 8

Same flags and meaning as Megatron-LM's tools/preprocess_data.py; the tokenizer flags
(--tokenizer-type, --tokenizer-model, --vocab-file, --merge-file) are megatron_lime.tokenizer's,
shared by every tool, and a tokenizer that could not be exported is refused here, first. Input: JSONL, JSONL.gz or parquet files, a directory or
glob of them, or a `datasets` dataset saved to disk.

How it runs: the main process only reads raw input (JSONL bytes split at line ends, parquet
record batches) and writes tokens; worker processes parse, validate and tokenize. At most
2 x --workers chunks are in flight and results are written in input order, so memory stays
flat however large the input is. Output goes to temporary names and is renamed at the end:
after an error no .bin/.idx with the final name exists.
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

from megatron_lime.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megatron_lime.data.readers import (BadRecordError, InputSource, check_string_value, find_inputs,
                                        load_saved_dataset, open_binary, open_parquet, parse_jsonl_line)
from megatron_lime.tokenizer import LimeTokenizer, TokenizerSpec, add_tokenizer_args, build_tokenizer

# Bytes of JSONL (or rows of parquet) per worker task: big enough to amortise the
# inter-process hop, small enough that 2 x workers of them in flight stay a few MB.
CHUNK_BYTES = 1 << 20
CHUNK_ROWS = 512
# How many bad records are printed in full with --skip-bad-records (all are counted).
MAX_BAD_RECORDS_SHOWN = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSONL / JSONL.gz / parquet file, directory or glob, or a saved `datasets` dataset.")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="Fields (columns) to tokenize; one output dataset per key.")
    group.add_argument("--split-sentences", action="store_true", help="Not supported (documents are never split); kept so Megatron command lines fail loudly.")
    group = add_tokenizer_args(parser)
    group.add_argument("--append-eod", action="store_true", help="Append the <eos> id to every document (separates documents in packed samples).")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="Writes OUTPUT_PREFIX_{key}_document.bin/.idx.")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="Megatron's only format (accepted for compatibility).")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="Tokenizer worker processes.")
    group.add_argument("--partitions", type=int, default=1, help="Accepted for compatibility; only 1 is supported (workers already parallelise).")
    group.add_argument("--log-interval", type=int, default=10_000, help="Documents between progress updates.")
    group.add_argument("--skip-bad-records", action="store_true", help="Skip malformed records (counted and reported) instead of stopping.")
    group.add_argument("--quiet", action="store_true", help="No progress bar (the summary is still printed).")
    args = parser.parse_args(argv)
    if args.split_sentences:
        parser.error("--split-sentences is not supported: LIME trains on whole documents")
    if args.partitions != 1:
        parser.error("--partitions other than 1 is not supported; use --workers")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


# ---------------------------------------------------------------------------------------
# Work units. The main process makes them; workers turn them into tokens.


@dataclass
class Chunk:
    """A slice of one input: raw JSONL bytes (whole lines) or a pyarrow table of the key columns."""

    path: str
    first_record: int  # line number (JSONL, 1-based) or row number (parquet / datasets, 0-based)
    jsonl_bytes: bytes | None = None
    table: object | None = None  # pyarrow.RecordBatch or Table
    bad_file_reason: str | None = None  # the whole file could not be read


@dataclass
class ChunkResult:
    tokens: list[np.ndarray]  # per key: ids of the chunk's documents back to back
    lengths: list[np.ndarray]  # per key: tokens per document
    num_documents: int = 0
    num_empty: int = 0
    num_bytes: int = 0
    bad_records: list[str] = field(default_factory=list)
    num_bad: int = 0


def iter_chunks(sources: list[InputSource], keys: tuple[str, ...], skip_bad: bool) -> Iterator[Chunk]:
    for source in sources:
        if source.kind == "jsonl":
            yield from jsonl_chunks(source.path)
        elif source.kind == "parquet":
            try:
                parquet = open_parquet(source.path, keys)
                row = 0
                for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=list(keys)):
                    yield Chunk(source.path, row, table=batch)
                    row += batch.num_rows
            except BadRecordError as e:
                if not skip_bad:
                    raise
                yield Chunk(source.path, 0, bad_file_reason=str(e))
            except Exception as e:  # a corrupt page part-way through the file
                if not skip_bad:
                    raise BadRecordError(source.path, "file", f"unreadable parquet data ({type(e).__name__}: {e})") from None
                yield Chunk(source.path, 0, bad_file_reason=f"{source.path}: unreadable parquet data ({e})")
        elif source.kind == "datasets":
            dataset = load_saved_dataset(source.path, keys)
            row = 0
            for table in dataset.with_format("arrow").iter(batch_size=CHUNK_ROWS):
                yield Chunk(source.path, row, table=table.select(list(keys)))
                row += table.num_rows


def jsonl_chunks(path: str) -> Iterator[Chunk]:
    """~CHUNK_BYTES blocks of whole lines; the main process never parses JSON."""
    line_number = 1
    with open_binary(path) as f:
        remainder = b""
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            block = remainder + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                remainder = block
                continue
            remainder = block[cut:]
            yield Chunk(path, line_number, jsonl_bytes=block[:cut])
            line_number += block.count(b"\n", 0, cut)
        if remainder:
            yield Chunk(path, line_number, jsonl_bytes=remainder)


# Worker state, set once per process by init_worker.
WORKER: dict[str, object] = {}


def init_worker(tokenizer_spec: TokenizerSpec, keys: tuple[str, ...], append_eod: bool, skip_bad: bool) -> None:
    # One process per core already: a Hugging Face tokenizer must not start its own thread pool too.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(tokenizer_spec, check=False)  # the main process checked it
    WORKER.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod, skip_bad=skip_bad,
                  dtype=best_dtype(tokenizer.vocab_size))


def encode_chunk(chunk: Chunk) -> ChunkResult | BadRecordError:
    """Parse, validate and tokenize one chunk. A bad record is returned (not raised) without --skip-bad-records."""
    tokenizer: LimeTokenizer = WORKER["tokenizer"]  # type: ignore[assignment]
    keys: tuple[str, ...] = WORKER["keys"]  # type: ignore[assignment]
    skip_bad = bool(WORKER["skip_bad"])
    result = ChunkResult(tokens=[], lengths=[])
    if chunk.bad_file_reason is not None:
        result.num_bad, result.bad_records = 1, [chunk.bad_file_reason]
        return result
    columns: list[list[str]] = [[] for _ in keys]

    def bad(error: BadRecordError) -> BadRecordError | None:
        if not skip_bad:
            return error
        result.num_bad += 1
        if len(result.bad_records) < MAX_BAD_RECORDS_SHOWN:
            result.bad_records.append(str(error))
        return None

    if chunk.jsonl_bytes is not None:
        result.num_bytes = len(chunk.jsonl_bytes)
        for i, line in enumerate(chunk.jsonl_bytes.split(b"\n")):
            try:
                values = parse_jsonl_line(line, chunk.path, chunk.first_record + i, keys)
            except BadRecordError as e:
                if (error := bad(e)) is not None:
                    return error
                continue
            if values is not None:
                for column, value in zip(columns, values):
                    column.append(value)
    else:
        table = chunk.table
        raw = [table.column(k).to_pylist() for k in keys]
        for i in range(table.num_rows):
            try:
                values = [check_string_value(col[i], chunk.path, chunk.first_record + i, k) for col, k in zip(raw, keys)]
            except BadRecordError as e:
                if (error := bad(e)) is not None:
                    return error
                continue
            for column, value in zip(columns, values):
                column.append(value)
                result.num_bytes += len(value)  # characters; close to bytes for English

    result.num_documents = len(columns[0])
    eod = [tokenizer.eos_id] if WORKER["append_eod"] else []
    dtype = WORKER["dtype"]
    for column in columns:
        encoded = tokenizer.encode_batch(column)
        kept = [ids + eod for ids in encoded if ids]
        result.num_empty += len(encoded) - len(kept)
        lengths = np.fromiter((len(ids) for ids in kept), dtype=np.int32, count=len(kept))
        tokens = np.fromiter(itertools.chain.from_iterable(kept), dtype=dtype, count=int(lengths.sum()))
        result.tokens.append(tokens)
        result.lengths.append(lengths)
    return result


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
                self.bar.set_postfix_str(f"{self.tokens / elapsed / 1e3:,.0f}k tok/s, {self.bytes / elapsed / 1e6:.1f} MB/s",
                                         refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> dict[str, float]:
    """Tokenize everything; returns the summary. Raises BadRecordError on the first bad record (unless skipping)."""
    start = time.perf_counter()
    keys = tuple(args.json_keys)
    sources = [s for pattern in args.input.split(",") for s in find_inputs(pattern)]
    tokenizer_spec = TokenizerSpec.from_args(args)
    tokenizer = build_tokenizer(tokenizer_spec)
    dtype = best_dtype(tokenizer.vocab_size)
    writers = [IndexedDatasetWriter(f"{args.output_prefix}_{key}_document", dtype) for key in keys]
    summary = {"documents": 0, "tokens": 0, "empty_skipped": 0, "bad_records": 0, "bytes": 0}
    bad_shown: list[str] = []
    progress = Progress(args.quiet, args.log_interval)
    max_in_flight = 2 * args.workers
    # fork: workers start in milliseconds (spawn would re-import numpy/sentencepiece in each).
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context("fork"), initializer=init_worker,
        initargs=(tokenizer_spec, keys, args.append_eod, args.skip_bad_records))
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
        summary["bad_records"] += result.num_bad
        summary["bytes"] += result.num_bytes
        for message in result.bad_records:
            if len(bad_shown) < MAX_BAD_RECORDS_SHOWN:
                bad_shown.append(message)
                print(f"warning: skipped bad record: {message}", file=sys.stderr)
        progress.update(result.num_documents, num_tokens, result.num_bytes)

    try:
        for chunk in iter_chunks(sources, keys, args.skip_bad_records):
            pending.append(pool.submit(encode_chunk, chunk))
            if len(pending) >= max_in_flight:
                collect()
        while pending:
            collect()
        for writer in writers:
            writer.finalize()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        # On error: queued chunks are cancelled, the few running ones finish (milliseconds).
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    summary["seconds"] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (BadRecordError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, BadRecordError):
            print("(no output written; pass --skip-bad-records to skip such records)", file=sys.stderr)
        return 1
    seconds = summary["seconds"]
    outputs = ", ".join(f"{args.output_prefix}_{k}_document.{{bin,idx}}" for k in args.json_keys)
    print(
        f"done: {summary['documents']:,} documents, {summary['tokens']:,} tokens, "
        f"{summary['empty_skipped']:,} empty documents skipped, {summary['bad_records']:,} bad records skipped, "
        f"{seconds:.1f} s ({summary['documents'] / seconds:,.0f} docs/s, {summary['tokens'] / seconds:,.0f} tokens/s, "
        f"{summary['bytes'] / seconds / 1e6:.1f} MB/s) -> {outputs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
