#!/usr/bin/env python
"""Convert a LIME checkpoint to a Hugging Face folder, or a Hugging Face folder back to our format.

    # DeepSpeed checkpoint (any data-parallel size; fp32 master weights when present) -> HF
    python tools/convert_to_hf.py --load checkpoints/lime-1b-sft [--tag global_step3000] \
        --tokenizer tokenizers/lime-50k --output exports/lime-1b-instruct --dtype bf16

    # our consolidated checkpoint (model.safetensors + lime_config.json) -> HF
    python tools/convert_to_hf.py --load checkpoints/lime-1b-consolidated --output exports/lime-1b

    # HF -> consolidated, to continue training:  train ... --load checkpoints/from-hf --finetune
    python tools/convert_to_hf.py --from-hf --load exports/lime-1b --output checkpoints/from-hf

The export loads offline with AutoTokenizer.from_pretrained(DIR) and
AutoModelForCausalLM.from_pretrained(DIR, torch_dtype=torch.bfloat16, trust_remote_code=True).
--tokenizer defaults to the tokenizer recorded in the checkpoint's lime_config.json.
The output is written to a temporary directory and renamed into place when complete. It may not be
the --load folder, contain it or lie inside it; --overwrite replaces only a folder recognised as an
export (flat: model.safetensors, config.json or lime_config.json, and config/weights/code/card/tokenizer
files; see hf_export.check_output_folder), never anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from megatron_lime.checkpoint import load_model
from megatron_lime.conversion.hf_export import DTYPES, check_output_folder, export_to_hf, import_from_hf
from megatron_lime.errors import LimeInputError, reports_input_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="Checkpoint: DeepSpeed save dir, consolidated dir, or (with --from-hf) a HF folder.")
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: the one in SAVE_DIR/latest).")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer directory or .model (default: the one recorded in lime_config.json).")
    parser.add_argument("--output", required=True, help="Folder to write (replaced if it exists and --overwrite).")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="Dtype of the exported weights.")
    parser.add_argument("--from-hf", action="store_true",
                        help="Reverse direction: HF folder (--load) -> consolidated checkpoint (--output), fp32.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --output if it exists and holds an earlier export (anything else is refused).")
    return parser.parse_args(argv)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    output = Path(args.output)
    start = time.perf_counter()
    check_output_folder(output, args.load, args.overwrite)
    if args.from_hf:
        if args.tag is not None:
            raise LimeInputError("--tag applies to DeepSpeed checkpoints, not to --from-hf")
        weights = import_from_hf(args.load, output)
        print(f"done: {args.load} -> consolidated checkpoint {output} "
              f"({weights.config.num_parameters() / 1e6:.1f}M parameters, fp32, "
              f"{time.perf_counter() - start:.1f} s); train with --load {output} --finetune")
        return 0
    logging.info("reading %s", args.load)
    weights = load_model(args.load, tag=args.tag, tokenizer=args.tokenizer)
    logging.info("read %s", weights.source)
    export_to_hf(weights, output, dtype=args.dtype)
    print(f"done: {weights.source} -> {output} ({weights.config.num_parameters() / 1e6:.1f}M parameters, "
          f"{args.dtype}, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
