#!/usr/bin/env python
"""Tokenize a corpus into Megatron-LM indexed datasets (PREFIX_{key}_document.bin / .idx).

    python tools/preprocess_data.py --input 'fineweb-edu/CC-MAIN-2025-05/*.parquet' \
        --json-keys text --tokenizer-model tokenizers/lime-50k --append-eod \
        --output-prefix data/fineweb_edu --workers 8

The flags, and how it runs: megatron_lime/data/preprocess.py (`--help` prints them).
"""

import sys

from megatron_lime.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
