""":"
# Instruction-tune LIME-1B (the model card's SFT): DeepSpeed ZeRO-1 + bf16, packed SFT sequences.
#
# Same two ways to run as examples/pretrain_lime_1b.sh (overrides at the end win):
#   bash examples/sft_lime_1b.sh [overrides]             starts megatron_lime/training/launch.py on every
#                                                        local GPU (no GPU: 2 CPU processes with gloo);
#                                                        on SIGTERM it waits for the ranks' checkpoint
#   deepspeed [launcher options] examples/sft_lime_1b.sh [overrides]
# Paths come from the environment:
#   DATA_PATH        SFT dataset prefix(es) from tools/preprocess_sft_data.py (PREFIX_text_document,
#                    with its _loss_mask_document beside it), or a weighted blend "w1 P1 w2 P2"
#   TOKENIZER_MODEL  the tokenizer the pretraining used
#   PRETRAINED       the pretrained checkpoint: a DeepSpeed save dir (with latest) or a consolidated
#                    dir (model.safetensors + lime_config.json, e.g. from convert_to_hf.py --from-hf);
#                    loaded with --finetune: weights only, fresh optimizer, step 0
#   SAVE_DIR         SFT checkpoints (CHECKPOINT_PATH is accepted too)
#   SFT_ITERS        optimizer steps (default 3,000)
#   PRECISION        autocast (the model card's; the default on GPUs), bf16 or fp32 (the default without a GPU);
#                    a --precision, --bf16 or --no-bf16 override wins (examples/launch.sh)
# Rerunning the same command after an interruption resumes from SAVE_DIR/latest instead.
#
# Arithmetic (lime-1b, 6.20e9 training FLOPs per token at s = 512):
#   tokens per step  = global batch 64 x seq 512 = 32,768 (8 GPUs: micro 8 x accumulation 1 x 8 ranks)
#   steps            = SFT_ITERS = 3,000 -> 98,304,000 token positions; the card's mixture (~97k
#                      examples) packed into 512-token sequences: tools/preprocess_sft_data.py prints
#                      its token count, divide by 32,768 for steps per epoch
#   LR               = the card's SFT recipe: peak 8e-5, 10% warmup (300 steps), linear decay to 1e-5
#   expected time    = 6.20e9 x 98.3e6 / (8 x 312e12 x MFU) on 8 x A100: 8.1 min at 50% MFU

set -euo pipefail
SCRIPT="${BASH_SOURCE[0]}"
SCRIPT_DIR="$(cd "$(dirname "$SCRIPT")" && pwd)"

DATA_PATH="${DATA_PATH:-data/sft/lime_sft_text_document}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizers/lime-50k}"
PRETRAINED="${PRETRAINED:-checkpoints/lime-1b-pretrain}"
SAVE_DIR="${SAVE_DIR:-${CHECKPOINT_PATH:-checkpoints/lime-1b-sft}}"
SFT_ITERS="${SFT_ITERS:-3000}"
read -r -a DATA_PATH_WORDS <<< "$DATA_PATH"

MODEL_ARGS=(
    --model lime-1b
    --seq-length 512
)
TRAINING_ARGS=(
    --recipe sft                # AdamW b1 0.9, b2 0.95; peak 8e-5, 10% warmup, polynomial (linear) decay to 1e-5
    --micro-batch-size 8
    --global-batch-size 64
    --train-iters "$SFT_ITERS"
    --weight-decay 0.1
    --clip-grad 1.0
    --seed 1234
    --deepspeed-config "$SCRIPT_DIR/ds_config_zero1_bf16.json"
    --zero-stage 1
)
DATA_ARGS=(
    --data-path "${DATA_PATH_WORDS[@]}"
    --tokenizer-model "$TOKENIZER_MODEL"
    --split 98,2,0
    --dataset-type sft
    --sft-packing
    --num-workers 2
)
if [[ -f "$SAVE_DIR/latest" ]]; then  # an interrupted SFT run: resume it (optimizer, step, data position)
    LOAD_ARGS=(--load "$SAVE_DIR" --no-finetune)
else                                 # a new SFT run: the pretrained weights, fresh optimizer, step 0
    LOAD_ARGS=(--load "$PRETRAINED" --finetune)
fi
CHECKPOINT_ARGS=(
    "${LOAD_ARGS[@]}"
    --save "$SAVE_DIR"
    --save-interval 500
    --keep-last 2
)
LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 250
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
