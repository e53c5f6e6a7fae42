#!/usr/bin/env python
"""Write the embedded sample corpus: no download, English prose from the Python standard library.

    python tools/make_sample_data.py --output-dir data/sample

writes data/sample/pretrain.jsonl (FineWeb-Edu's schema) and data/sample/sft_dolly.jsonl
(databricks-dolly-15k's schema). The same Python version always gives the same bytes.
"""

import argparse
import os
import sys
import time

from megatron_lime.errors import reports_input_errors
from megatron_lime.files import naming_output
from megatron_lime.sample_data import write_instruction_set, write_pretraining_corpus


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="Directory for pretrain.jsonl and sft_dolly.jsonl.")
    parser.add_argument("--max-megabytes", type=float, default=8.0,
                        help="Stop the pretraining corpus after this much text (default: 8; the standard "
                             "library of CPython 3.11 has about 1.8 MB of docstrings and reference topics).")
    parser.add_argument("--max-sft-examples", type=int, default=3000,
                        help="Number of instruction examples to write (default: 3000).")
    args = parser.parse_args(argv)
    if args.max_megabytes <= 0 or args.max_sft_examples <= 0:
        parser.error("--max-megabytes and --max-sft-examples must be positive")

    with naming_output(args.output_dir):  # a read-only place: one line naming it
        os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    corpus = write_pretraining_corpus(os.path.join(args.output_dir, "pretrain.jsonl"),
                                      max_bytes=int(args.max_megabytes * 1e6))
    instructions = write_instruction_set(os.path.join(args.output_dir, "sft_dolly.jsonl"),
                                         max_examples=args.max_sft_examples)
    print(f"pretraining corpus: {corpus['documents']} documents, {corpus['bytes'] / 1e6:.2f} MB -> {corpus['path']}")
    print(f"instruction set:    {instructions['examples']} examples (dolly schema) -> {instructions['path']}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
