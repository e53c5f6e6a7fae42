""":"
# Pretrain LIME-1B on FineWeb-Edu (the model card's run): DeepSpeed ZeRO-1 + bf16, data parallel.
#
# Run it either way (overrides are Megatron-style flags at the end; they win over the ones below):
#   bash examples/pretrain_lime_1b.sh [overrides]        starts megatron_lime/training/launch.py on every
#                                                        local GPU (no GPU: 2 CPU processes with gloo);
#                                                        on SIGTERM it waits for the ranks' checkpoint
#   deepspeed [launcher options] examples/pretrain_lime_1b.sh [overrides]
#                                                        the launcher runs this file with python on
#                                                        each rank; the python part at the bottom
#                                                        asks bash for the arrays below; on SIGTERM
#                                                        DeepSpeed's command returns at once, the ranks
#                                                        still save and exit
# Paths come from the environment:
#   DATA_PATH        dataset prefix, or a blend "0.7 PREFIX_A 0.3 PREFIX_B" (tools/preprocess_data.py)
#   TOKENIZER_MODEL  tokenizer directory (tools/train_tokenizer.py) or sentencepiece .model
#   SAVE_DIR         checkpoints (CHECKPOINT_PATH is accepted too); LOAD_DIR defaults to SAVE_DIR, so
#                    rerunning the same command resumes where a stopped run left off
#   HOSTFILE         multi-node with bash: a DeepSpeed hostfile (see examples/hostfile)
#   MASTER_PORT      rendezvous port for the bash form (default 29500)
#   PRECISION        autocast (the model card's; the default on GPUs), bf16 or fp32 (the default without a GPU);
#                    a --precision, --bf16 or --no-bf16 override wins (examples/launch.sh)
# Tiny CPU smoke run:
#   bash examples/pretrain_lime_1b.sh --model lime-tiny --data-path PREFIX --tokenizer-model DIR \
#       --save /tmp/ckpt --load /tmp/ckpt --train-iters 20 --micro-batch-size 2 --global-batch-size 4 \
#       --log-interval 1 --eval-interval 10
#
# Arithmetic (lime-1b: 982.9M parameters, 6N + 12 L d s = 6.20e9 training FLOPs per token at s = 512):
#   tokens per step  = global batch 512 x seq 512 = 262,144
#                      (8 GPUs: micro batch 16 x accumulation 4 x 8 ranks = 512)
#   steps            = ceil(20e9 / 262,144) = 76,294  ->  20,000,014,336 tokens in all
#   warmup           = 5% of 76,294 = 3,815 steps, then linear decay from 5e-4 to 5e-6
#   compute          = 6.20e9 x 20.0e9 = 1.24e20 FLOPs
#   expected time    = 1.24e20 / (8 x 312e12 FLOP/s x MFU) on 8 x A100 80GB (bf16 dense peak 312 TFLOP/s):
#                      22.3 h at 62% MFU (this stack's target), 27.6 h at 50%, 34.5 h at 40%.
#                      Measure yours: the log line prints MFU every --log-interval steps.

set -euo pipefail
SCRIPT="${BASH_SOURCE[0]}"
SCRIPT_DIR="$(cd "$(dirname "$SCRIPT")" && pwd)"

DATA_PATH="${DATA_PATH:-data/fineweb-edu/fineweb_edu_CC-MAIN-2025-05_text_document}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizers/lime-50k}"
SAVE_DIR="${SAVE_DIR:-${CHECKPOINT_PATH:-checkpoints/lime-1b-pretrain}}"
LOAD_DIR="${LOAD_DIR:-$SAVE_DIR}"
read -r -a DATA_PATH_WORDS <<< "$DATA_PATH"

MODEL_ARGS=(
    --model lime-1b             # 32 layers, d 1536, FFN 6144, 24 heads, vocab 50,000
    --seq-length 512
)
TRAINING_ARGS=(
    --recipe pretrain           # AdamW b1 0.9, b2 0.95, eps 1e-8; peak 5e-4, 5% warmup, polynomial decay to 5e-6
    --micro-batch-size 16
    --global-batch-size 512
    --train-tokens 20000000000
    --weight-decay 0.1
    --clip-grad 1.0
    --seed 1234
    --deepspeed-config "$SCRIPT_DIR/ds_config_zero1_bf16.json"
    --zero-stage 1
)
DATA_ARGS=(
    --data-path "${DATA_PATH_WORDS[@]}"
    --tokenizer-model "$TOKENIZER_MODEL"
    --split 969,30,1
    --dataset-type gpt
    --num-workers 2
)
CHECKPOINT_ARGS=(
    --save "$SAVE_DIR"
    --load "$LOAD_DIR"
    --save-interval 1000
    --keep-last 3
)
LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 1000
    --eval-iters 10
    --tensorboard-dir "$SAVE_DIR/tensorboard"
)

source "$SCRIPT_DIR/launch.sh"
launch_or_print_args "$SCRIPT" "$@"
":"""
# The Python side, run by the launcher on every rank (bash never gets here): see examples/launch.sh.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without pip install
from megatron_lime.training.pretrain import train_with_script_flags  # noqa: E402

sys.exit(train_with_script_flags(__file__, sys.argv[1:]))
