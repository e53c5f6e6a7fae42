"""Tokenise an SFT mixture into the pair of indexed datasets the SFT loader reads.

    {prefix}_text_document.bin/.idx       every example's tokens, one document per example
    {prefix}_loss_mask_document.bin/.idx  uint8, one 0/1 per token: 1 = a trained target
    {prefix}_summary.json                 the per-dataset counts printed at the end

Steps per dataset: read rows -> adapter -> (seeded cap) -> tokenise + template -> over-length
policy -> copies by weight. All datasets' examples are then shuffled together with the mixture
seed (so Megatron-style contiguous splits of the file are representative) and written to
temporary names that are renamed into place only when everything succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megatron_lime.data.indexed_dataset import DatasetWriteError, IndexedDatasetWriter, best_dtype, written_together
from megatron_lime.data.readers import BadRecordError, RowLocation, iter_input_rows
from megatron_lime.data.sft.adapters import get_adapter
from megatron_lime.data.sft.mixture import Mixture, MixtureEntry, MixtureError, load_mixture
from megatron_lime.data.sft.template import (OVER_LENGTH_POLICIES, SFTExample, SFTTokenizer, TemplateIds,
                                             encode_examples, render)
from megatron_lime.errors import LimeInputError, reports_input_errors
from megatron_lime.files import write_json
from megatron_lime.tokenizer import TokenizerSpec, add_tokenizer_args, build_tokenizer, describe_added_chat_tokens

logger = logging.getLogger(__name__)

TOKENIZE_CHUNK = 512  # examples per encode_batch call
BAD_RECORDS_SHOWN = 5  # skipped bad rows whose reason is logged, per dataset


class SFTDataError(LimeInputError):
    """SFT data that cannot be used, in one line: a bad row when bad rows are not skipped (names the dataset,
    the file and the row), a mixture without examples, or a preprocessed pair the datasets cannot use
    (mismatched text and loss-mask files, examples longer than the sequence)."""


def text_prefix(output_prefix: str) -> str:
    return f"{output_prefix}_text_document"


def loss_mask_prefix(output_prefix: str) -> str:
    return f"{output_prefix}_loss_mask_document"


def loss_mask_prefix_for(text_document_prefix: str) -> str:
    """The loss-mask prefix that goes with a `..._text_document` prefix."""
    if not text_document_prefix.endswith("_text_document"):
        raise SFTDataError(f"an SFT data prefix must end in '_text_document' (as written by "
                           f"tools/preprocess_sft_data.py), got {text_document_prefix!r}")
    return text_document_prefix.removesuffix("_text_document") + "_loss_mask_document"


@dataclass
class DatasetSummary:
    """What happened to one dataset of the mixture."""

    name: str
    path: str
    rows_read: int = 0
    filtered: int = 0  # rows the adapter leaves out on purpose (e.g. other languages)
    skipped_bad: int = 0
    examples: int = 0  # examples the adapter produced
    multi_turn: int = 0  # of the written distinct examples: conversations with more than one trained turn
    not_selected: int = 0  # left out by max_examples
    dropped_too_long: int = 0
    truncated_context: int = 0
    truncated_turns: int = 0
    distinct_written: int = 0
    written: int = 0  # including copies made by weight
    tokens: int = 0
    trained_tokens: int = 0
    bad_record_examples: list[str] = field(default_factory=list)


@dataclass
class _Rendered:
    tokens: np.ndarray  # (n,) int64
    loss_mask: np.ndarray  # (n,) uint8


def _read_examples(entry: MixtureEntry, summary: DatasetSummary, skip_bad_records: bool,
                   progress: bool) -> list[SFTExample]:
    adapter = get_adapter(entry.name, entry.options)
    examples: list[SFTExample] = []

    def bad(location: RowLocation, reason: str) -> None:
        message = f"{entry.name}: {location}: {reason}"
        if not skip_bad_records:
            raise SFTDataError(message + " (pass --skip-bad-records to skip such rows and count them)")
        summary.skipped_bad += 1
        if len(summary.bad_record_examples) < BAD_RECORDS_SHOWN:
            summary.bad_record_examples.append(message)
            logger.warning("skipping bad record: %s", message)

    rows = iter_input_rows(entry.path, entry.split)
    for location, row in tqdm(rows, desc=f"reading {entry.name}", unit=" rows", mininterval=0.5,
                              dynamic_ncols=True, disable=not progress):
        summary.rows_read += 1
        if isinstance(row, BadRecordError):  # a line that does not parse, or the damaged rest of a .gz
            bad(location, row.reason)
            continue
        try:
            example = adapter.convert(row)
        except BadRecordError as e:
            bad(location, e.reason)
            continue
        if example is None:
            summary.filtered += 1
            continue
        examples.append(example)
    summary.examples = len(examples)
    return examples


def _render_selected(examples: list[SFTExample], entry: MixtureEntry, mixture: Mixture, ids: TemplateIds,
                     tokenizer: SFTTokenizer, rng: np.random.Generator, summary: DatasetSummary,
                     progress: bool) -> list[_Rendered]:
    """Tokenise examples (in a seeded random order when capped) until the cap is reached."""
    cap = entry.max_examples
    order = rng.permutation(len(examples)) if cap is not None and cap < len(examples) else np.arange(len(examples))
    max_tokens = mixture.seq_length + 1  # the last <eos> is only ever a target, never an input position
    kept: list[_Rendered] = []
    bar = tqdm(total=min(len(examples), cap or len(examples)), desc=f"tokenising {entry.name}",
               unit=" examples", mininterval=0.5, dynamic_ncols=True, disable=not progress)
    examined = 0
    for start in range(0, len(order), TOKENIZE_CHUNK):
        if cap is not None and len(kept) >= cap:
            break
        chunk = [examples[i] for i in order[start:start + TOKENIZE_CHUNK]]
        for example, encoded in zip(chunk, encode_examples(chunk, tokenizer)):
            if cap is not None and len(kept) >= cap:
                break
            examined += 1
            rendered = render(encoded, ids, max_tokens, mixture.over_length)  # type: ignore[arg-type]
            if rendered is None:
                summary.dropped_too_long += 1
                continue
            summary.truncated_context += rendered.context_truncated
            summary.truncated_turns += rendered.turns_dropped > 0
            summary.multi_turn += len(example.turns) - rendered.turns_dropped > 1
            kept.append(_Rendered(np.asarray(rendered.token_ids, dtype=np.int64),
                                  np.asarray(rendered.loss_mask, dtype=np.uint8)))
            bar.update(1)
    bar.close()
    summary.not_selected = len(examples) - examined
    summary.distinct_written = len(kept)
    return kept


def _copies_by_weight(kept: list[_Rendered], weight: float, rng: np.random.Generator) -> list[_Rendered]:
    """floor(weight) copies of every example plus a seeded random subset for the fraction."""
    whole, fraction = int(math.floor(weight)), weight - math.floor(weight)
    extra = rng.choice(len(kept), size=int(round(fraction * len(kept))), replace=False) if kept else []
    return kept * whole + [kept[i] for i in sorted(extra)]


def preprocess_mixture(mixture: Mixture, tokenizer: SFTTokenizer, output_prefix: str,
                       skip_bad_records: bool = False, vocab_size: int | None = None,
                       progress: bool = True) -> list[DatasetSummary]:
    """Tokenise every dataset of the mixture and write the text / loss-mask pair; returns the summaries.

    Raises SFTDataError on the first bad row unless skip_bad_records; `progress` shows tqdm bars.
    """
    ids = TemplateIds.from_tokenizer(tokenizer)
    vocab_size = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size")
    summaries: list[DatasetSummary] = []
    written: list[_Rendered] = []
    for index, entry in enumerate(mixture.datasets):
        summary = DatasetSummary(name=entry.name, path=entry.path)
        rng = np.random.default_rng([mixture.seed, index])
        examples = _read_examples(entry, summary, skip_bad_records, progress)
        kept = _render_selected(examples, entry, mixture, ids, tokenizer, rng, summary, progress)
        copies = _copies_by_weight(kept, entry.weight, rng)
        summary.written = len(copies)
        summary.tokens = int(sum(r.tokens.size for r in copies))
        summary.trained_tokens = int(sum(int(r.loss_mask.sum()) for r in copies))
        summaries.append(summary)
        written.extend(copies)
        logger.debug("%s: %d examples written", entry.name, summary.written)
    if not written:
        raise SFTDataError(f"{mixture.source}: the mixture produced no examples (see the summary counts)")

    order = np.random.default_rng([mixture.seed, len(mixture.datasets)]).permutation(len(written))
    writers = _write_pair(output_prefix, [written[i] for i in order], best_dtype(vocab_size), progress)
    summary_path = f"{output_prefix}_summary.json"
    try:
        write_json(summary_path, {"mixture": mixture.source, "seq_length": mixture.seq_length,
                                  "over_length": mixture.over_length, "seed": mixture.seed,
                                  "datasets": [asdict(s) for s in summaries]}, sort_keys=False)
    except OSError as e:  # the pairs without their summary would look like a finished run
        for writer in writers:
            writer.remove_outputs()
        raise DatasetWriteError(summary_path, e) from e
    return summaries


def _batches(items: list[_Rendered], size: int = 4096) -> Iterator[list[_Rendered]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_pair(output_prefix: str, examples: list[_Rendered], token_dtype: type,
                progress: bool) -> list[IndexedDatasetWriter]:
    """Write the text / loss-mask pairs (both or neither); returns their finalized writers."""
    with written_together([]) as writers:
        text_writer = IndexedDatasetWriter(text_prefix(output_prefix), token_dtype)
        writers.append(text_writer)
        mask_writer = IndexedDatasetWriter(loss_mask_prefix(output_prefix), np.uint8)
        writers.append(mask_writer)
        for batch in tqdm(list(_batches(examples)), desc="writing", unit=" batches", dynamic_ncols=True,
                          disable=not progress):
            lengths = np.array([e.tokens.size for e in batch], dtype=np.int64)
            text_writer.add_documents(np.concatenate([e.tokens for e in batch]), lengths)
            mask_writer.add_documents(np.concatenate([e.loss_mask for e in batch]), lengths)
    return writers


SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rows_read", "rows read"), ("filtered", "filtered"), ("skipped_bad", "skipped bad"),
    ("examples", "examples"), ("not_selected", "over cap"), ("dropped_too_long", "dropped too long"),
    ("truncated_context", "truncated ctx"), ("truncated_turns", "truncated turns"), ("multi_turn", "multi-turn"),
    ("written", "written"), ("tokens", "tokens"), ("trained_tokens", "trained tokens"),
)


def format_summary(summaries: list[DatasetSummary]) -> str:
    """The per-dataset table printed at the end of preprocessing, with a total row."""
    names = [s.name for s in summaries] + ["total"]
    rows = [[getattr(s, key) for key, _ in SUMMARY_COLUMNS] for s in summaries]
    rows.append([sum(r[i] for r in rows) for i in range(len(SUMMARY_COLUMNS))])
    headers = ["dataset"] + [title for _, title in SUMMARY_COLUMNS]
    cells = [[name] + [f"{v:,}" for v in row] for name, row in zip(names, rows)]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(c) for c in cells[:-1]] + [line(["-" * w for w in widths]), line(cells[-1])]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# The command line (tools/preprocess_sft_data.py).

COMMAND_LINE_HELP = """Tokenise an instruction-tuning mixture into an indexed dataset plus a parallel loss mask.

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=COMMAND_LINE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", required=True, help="Mixture YAML (datasets, paths, splits, caps, weights, seed).")
    add_tokenizer_args(parser)  # <user>, <assistant>, <context> are added as new ids when the tokenizer lacks them
    parser.add_argument("--output-prefix", required=True,
                        help="Writes PREFIX_text_document.{bin,idx}, PREFIX_loss_mask_document.{bin,idx}, "
                             "PREFIX_summary.json.")
    parser.add_argument("--data-root", default=None,
                        help="Resolve the mixture's relative paths against this directory.")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="Training sequence length (overrides the mixture's); examples may have seq_length + 1 "
                             "tokens.")
    parser.add_argument("--over-length", choices=OVER_LENGTH_POLICIES, default=None,
                        help="Longer examples: drop, or truncate (context first, then trailing turns). Overrides the "
                             "mixture's.")
    parser.add_argument("--seed", type=int, default=None,
                        help="Seed of caps, fractional weights and the shuffle (overrides the mixture's).")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="Skip rows that cannot become examples and count them, instead of stopping.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars (the summary is still printed).")
    return parser.parse_args(argv)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
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
    print(f"\nSFT mixture {args.mixture}: seq_length {mixture.seq_length} (examples up to {mixture.seq_length + 1} "
          f"tokens), over-length policy {mixture.over_length}, seed {mixture.seed}")
    print(format_summary(summaries))
    for summary in summaries:
        for message in summary.bad_record_examples:
            print(f"skipped: {message}")
    seconds = time.perf_counter() - start
    examples, tokens = sum(s.written for s in summaries), sum(s.tokens for s in summaries)
    print(f"\nwrote {text_prefix(args.output_prefix)}.{{bin,idx}} and "
          f"{loss_mask_prefix(args.output_prefix)}.{{bin,idx}} "
          f"in {seconds:.1f} s ({examples / seconds:,.0f} examples/s, {tokens / seconds:,.0f} tokens/s)")
    return 0

