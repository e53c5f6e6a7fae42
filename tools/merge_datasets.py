#!/usr/bin/env python
"""Merge indexed datasets (.bin/.idx pairs) into one, in the order given.

    python tools/merge_datasets.py --input data/shards --output-prefix data/fineweb_edu_text_document

The flags: megatron_lime/data/merge.py (`--help` prints them).
"""

import sys

from megatron_lime.data.merge import main

if __name__ == "__main__":
    sys.exit(main())
