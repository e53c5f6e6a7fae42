"""Merge indexed datasets (.bin/.idx pairs) into one, in the order given (tools/merge_datasets.py is the command line).

    python tools/merge_datasets.py --input data/shards --output-prefix data/fineweb_edu_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

--input takes prefixes, or directories whose *.idx pairs are merged in sorted name order
(Megatron-LM's tools/merge_datasets.py takes one directory). All inputs must share a token
dtype. The output is written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import time

from megatron_lime.data.indexed_dataset import (IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
                                                strip_extension)
from megatron_lime.errors import LimeInputError, reports_input_errors


def input_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(strip_extension(os.path.join(item, n)) for n in os.listdir(item) if n.endswith(".idx"))
            if not found:
                raise IndexedDatasetError(f"{item}: no .idx files in this directory")
            prefixes.extend(found)
        else:
            prefixes.append(strip_extension(item))
    return prefixes


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="Dataset prefixes or directories of them.")
    parser.add_argument("--output-prefix", required=True, help="Prefix of the merged .bin/.idx.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    prefixes = input_prefixes(args.input)
    if strip_extension(args.output_prefix) in prefixes:
        raise LimeInputError(f"--output-prefix {args.output_prefix} is also an input")
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every pair before writing anything
    dtypes = {d.dtype for d in datasets}
    if len(dtypes) > 1:
        raise IndexedDatasetError("inputs have different token dtypes: "
                                  + ", ".join(f"{d.prefix}: {d.dtype.__name__}" for d in datasets))
    # A failed write (DatasetWriteError) leaves only temporary names, which the writer removes.
    with IndexedDatasetWriter(args.output_prefix, datasets[0].dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
    print(f"merged {len(prefixes)} datasets: {writer.num_documents:,} documents, {writer.num_tokens:,} tokens "
          f"in {time.perf_counter() - start:.1f} s -> {strip_extension(args.output_prefix)}.{{bin,idx}}")
    return 0

