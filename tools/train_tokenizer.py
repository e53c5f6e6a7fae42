#!/usr/bin/env python
"""Train the LIME tokenizer (sentencepiece BPE, byte fallback, lossless) on a text corpus.

    python tools/train_tokenizer.py --input 'fineweb-edu/*.parquet' --json-key text \
        --vocab-size 50000 --num-documents 300000 --sample-fraction 0.05 --output-dir tokenizers/lime-50k

Reads JSONL / JSONL.gz / parquet / plain text files (a file, directory or glob; several
--input allowed), keeps each document with probability --sample-fraction (seeded), and
stops at --num-documents documents or --max-bytes bytes, whichever comes first. Writes
tokenizer.model (sentencepiece), tokenizer.json + tokenizer_config.json (Hugging Face,
`AutoTokenizer.from_pretrained(dir)` works offline) and tokenizer_info.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Iterator

from megatron_lime.data.readers import find_inputs, iter_records
from megatron_lime.errors import reports_input_errors
from megatron_lime.tokenizer import load_tokenizer, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="Files, directories or globs of JSONL/JSONL.gz/parquet/txt.")
    parser.add_argument("--json-key", default="text", help="Field (JSONL) or column (parquet) holding the text.")
    parser.add_argument("--output-dir", required=True, help="Directory to write the tokenizer files into.")
    parser.add_argument("--vocab-size", type=int, default=50_000, help="Total vocabulary size (the card's is 50,000).")
    parser.add_argument("--num-documents", type=int, default=200_000, help="Stop after this many sampled documents.")
    parser.add_argument("--max-bytes", type=int, default=2_000_000_000,
                        help="Stop after this many sampled UTF-8 bytes.")
    parser.add_argument("--sample-fraction", type=float, default=1.0, help="Keep each document with this probability.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the document sampling.")
    parser.add_argument("--max-document-chars", type=int, default=100_000,
                        help="Longer documents are cut to this many characters.")
    parser.add_argument("--num-threads", type=int, default=1, help="sentencepiece trainer threads.")
    parser.add_argument("--verbose", action="store_true",
                        help="Show sentencepiece's training log (progress of long runs).")
    args = parser.parse_args(argv)
    if not 0.0 < args.sample_fraction <= 1.0:
        parser.error(f"--sample-fraction must be in (0, 1], got {args.sample_fraction}")
    return args


def sample_documents(args: argparse.Namespace, stats: dict[str, int]) -> Iterator[str]:
    """The sampled documents, streamed (sentencepiece keeps what it needs)."""
    rng = random.Random(args.seed)
    for pattern in args.input:
        for source in find_inputs(pattern, allow_text=True):
            for (text,) in iter_records(source, (args.json_key,)):
                if args.sample_fraction < 1.0 and rng.random() >= args.sample_fraction:
                    continue
                if stats["documents"] >= args.num_documents or stats["bytes"] >= args.max_bytes:
                    return
                stats["documents"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                yield text


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    stats = {"documents": 0, "bytes": 0}
    train_tokenizer(sample_documents(args, stats), args.output_dir, vocab_size=args.vocab_size,
                    num_threads=args.num_threads, max_document_chars=args.max_document_chars, verbose=args.verbose)
    tokenizer = load_tokenizer(args.output_dir)
    print(f"trained a {tokenizer.vocab_size}-entry tokenizer on {stats['documents']} documents "
          f"({stats['bytes'] / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s -> {args.output_dir}")
    print(f"special ids: {tokenizer.special_ids()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
