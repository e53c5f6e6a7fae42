#!/usr/bin/env python
"""Tokenise an instruction-tuning mixture into an indexed dataset plus a parallel loss mask.

    python tools/preprocess_sft_data.py --mixture examples/sft_mixture_lime_1b.yaml \
        --tokenizer tokenizers/lime-50k --output-prefix data/sft/lime_sft

writes data/sft/lime_sft_text_document.{bin,idx} (tokens of each example in the template
`[<context> ctx] <user> instruction <assistant> response <eos>`), data/sft/lime_sft_loss_mask_document.{bin,idx}
(uint8 per token, 1 = trained: every response and its <eos>) and data/sft/lime_sft_summary.json.
Train on it with `--data-path data/sft/lime_sft_text_document` (the loss mask is found beside it).

The mixture YAML names the datasets (by hub name, which picks the adapter), their paths, splits,
caps and weights: see megatron_lime/data/sft/README.md. A bad row stops the run with an error
naming the dataset, file and row, unless --skip-bad-records is given (then it is counted).
Exit status: 0 on success, 1 on any data or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from megatron_lime.data.indexed_dataset import IndexedDatasetError
from megatron_lime.data.sft.mixture import MixtureError, load_mixture
from megatron_lime.data.sft.preprocess import (SFTDataError, format_summary, loss_mask_prefix,
                                                preprocess_mixture, text_prefix)
from megatron_lime.data.sft.readers import DataFileError
from megatron_lime.data.sft.template import OVER_LENGTH_POLICIES
from megatron_lime.tokenizer import TokenizerSpec, add_tokenizer_args, build_tokenizer, describe_added_chat_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", required=True, help="Mixture YAML (datasets, paths, splits, caps, weights, seed).")
    # <user>, <assistant>, <context> are added as new ids when the tokenizer lacks them.
    add_tokenizer_args(parser)
    parser.add_argument("--output-prefix", required=True,
                        help="Writes PREFIX_text_document.{bin,idx}, PREFIX_loss_mask_document.{bin,idx}, PREFIX_summary.json.")
    parser.add_argument("--data-root", default=None, help="Resolve the mixture's relative paths against this directory.")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="Training sequence length (overrides the mixture's); examples may have seq_length + 1 tokens.")
    parser.add_argument("--over-length", choices=OVER_LENGTH_POLICIES, default=None,
                        help="Longer examples: drop, or truncate (context first, then trailing turns). Overrides the mixture's.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of caps, fractional weights and the shuffle (overrides the mixture's).")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="Skip rows that cannot become examples and count them, instead of stopping.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars (the summary is still printed).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        mixture = load_mixture(args.mixture, data_root=args.data_root)
        overrides = {k: v for k, v in (("seq_length", args.seq_length), ("over_length", args.over_length),
                                       ("seed", args.seed)) if v is not None}
        mixture = dataclasses.replace(mixture, **overrides)
        if mixture.seq_length <= 0:
            raise MixtureError(f"--seq-length must be positive, got {mixture.seq_length}")
        tokenizer = build_tokenizer(TokenizerSpec.from_args(args), chat_tokens=True)
        if describe_added_chat_tokens(tokenizer):
            print(describe_added_chat_tokens(tokenizer))
        summaries = preprocess_mixture(mixture, tokenizer, args.output_prefix, skip_bad_records=args.skip_bad_records,
                                       progress=not args.quiet)
    except (SFTDataError, MixtureError, DataFileError, IndexedDatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nSFT mixture {args.mixture}: seq_length {mixture.seq_length} (examples up to {mixture.seq_length + 1} "
          f"tokens), over-length policy {mixture.over_length}, seed {mixture.seed}")
    print(format_summary(summaries))
    for summary in summaries:
        for message in summary.bad_record_examples:
            print(f"skipped: {message}")
    seconds = time.perf_counter() - start
    examples, tokens = sum(s.written for s in summaries), sum(s.tokens for s in summaries)
    print(f"\nwrote {text_prefix(args.output_prefix)}.{{bin,idx}} and {loss_mask_prefix(args.output_prefix)}.{{bin,idx}} "
          f"in {seconds:.1f} s ({examples / seconds:,.0f} examples/s, {tokens / seconds:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
