#!/usr/bin/env python
"""Generate text from a LIME checkpoint or exported Hugging Face folder, streaming tokens to the terminal.

    # an exported folder, the model card's exact decoding (beam search: printed when done)
    python tools/generate.py --load exports/lime-1b-instruct --strategy card \
        --prompt "Write five questions for a Data Scientist interview."

    # a DeepSpeed checkpoint (latest tag) or a consolidated one, greedy, streamed token by token
    python tools/generate.py --load checkpoints/lime-1b-sft --prompt "What is RMSNorm?"

    # sampling, with retrieval context; a base model continues raw text with --raw
    python tools/generate.py --load ckpt --strategy sample --temperature 0.7 --top-p 0.9 \
        --context "RMSNorm rescales by the root mean square." --prompt "What does RMSNorm do?"

Without --prompt, prompts are read from stdin, one per line, until end of input.
Prompts go through the SFT template `[<context>context]<user>prompt<assistant>` unless --raw.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_lime.conversion.generation import STRATEGIES, DecodingSettings, load_generator
from megatron_lime.errors import reports_input_errors

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--load", required=True, help="Exported HF folder, DeepSpeed save dir or consolidated dir.")
    source.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: SAVE_DIR/latest).")
    source.add_argument("--tokenizer", default=None,
                        help="Tokenizer for a checkpoint (default: the one in lime_config.json; exports carry theirs).")
    source.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    source.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="Default: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs).")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--prompt", default=None, help="The question (default: read prompts from stdin).")
    prompt.add_argument("--context", default=None, help="Retrieval context / system text (the <context> block).")
    prompt.add_argument("--raw", action="store_true", help="No template: continue the text as is (base models).")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--strategy", default="greedy", choices=STRATEGIES,
                          help="greedy and sample stream; beam and card (the model card's beam search) print at "
                               "the end.")
    decoding.add_argument("--max-new-tokens", type=int, default=128)
    decoding.add_argument("--min-new-tokens", type=int, default=0)
    decoding.add_argument("--num-beams", type=int, default=4)
    decoding.add_argument("--temperature", type=float, default=0.8)
    decoding.add_argument("--top-p", type=float, default=0.95)
    decoding.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter.")
    decoding.add_argument("--repetition-penalty", type=float, default=1.0)
    decoding.add_argument("--no-repeat-ngram-size", type=int, default=0)
    decoding.add_argument("--seed", type=int, default=1234, help="Seed for sampling.")
    return parser.parse_args(argv)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")]
    settings = DecodingSettings(
        strategy=args.strategy, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    generator = load_generator(args.load, tokenizer_path=args.tokenizer, tag=args.tag, dtype=dtype, device=args.device)
    print(f"[loaded {generator.source} on {args.device}, {dtype}; strategy {args.strategy}]", file=sys.stderr)
    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        if not prompt.strip():
            continue
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        new_ids = generator.generate(prompt, settings, context=args.context, raw=args.raw, stream_to=sys.stdout)
        seconds = time.perf_counter() - start
        print(f"[{len(new_ids)} tokens in {seconds:.2f} s, {len(new_ids) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
