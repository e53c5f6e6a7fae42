"""Pretrain or fine-tune a LIME model (the Megatron-style entry point).

    deepspeed --num_gpus 8 pretrain_lime.py --model lime-1b --data-path PREFIX --tokenizer-model DIR \
        --micro-batch-size 16 --global-batch-size 512 --train-tokens 20000000000 --save DIR --load DIR
    python pretrain_lime.py --model lime-tiny ...      (one process)

examples/pretrain_lime_1b.sh holds the card's full recipe; see megatron_lime/training/pretrain.py.
"""

import sys

from megatron_lime.training.failures import run_guarded
from megatron_lime.training.pretrain import main

if __name__ == "__main__":
    sys.exit(run_guarded(main))
