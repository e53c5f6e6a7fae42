#!/usr/bin/env python
"""Tokenise an instruction-tuning mixture into an indexed dataset plus a parallel loss mask.

    python tools/preprocess_sft_data.py --mixture examples/sft_mixture_lime_1b.yaml \
        --tokenizer tokenizers/lime-50k --output-prefix data/sft/lime_sft

The flags, the outputs and the mixture format: megatron_lime/data/sft/preprocess.py and
megatron_lime/data/sft/README.md (`--help` prints them).
"""

import sys

from megatron_lime.data.sft.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
