#!/usr/bin/env bash
# The whole LIME pipeline, end to end, on an embedded sample corpus: nothing to download.
#
#   bash examples/quickstart.sh              # about 9 minutes on a 2-core CPU; faster on a GPU
#
# Stages (each prints what it did, how long it took and where its output is; a re-run skips
# stages that completed; a failure names the stage and its log):
#   1. data        English prose from the Python standard library's docstrings, written as
#                  FineWeb-Edu-schema JSONL, plus a dolly-schema instruction set derived from it
#   2. tokenizer   tools/train_tokenizer.py (sentencepiece BPE, byte fallback, lossless)
#   3. preprocess  tools/preprocess_data.py -> Megatron-format .bin/.idx
#   4. pretrain    examples/pretrain_lime_1b.sh (the bash form: our per-node launcher starting one
#                  DeepSpeed rank per GPU, else 2 CPU processes with gloo) with a small preset
#   5. sft-data    tools/preprocess_sft_data.py with the dolly adapter -> tokens + loss mask
#   6. sft         examples/sft_lime_1b.sh from the pretrained checkpoint (--finetune)
#   7. convert     tools/convert_to_hf.py -> a Hugging Face folder (safetensors, remote code, tokenizer)
#   8. generate    transformers loads the folder exactly as the model card does and answers a question
#   9. evaluate    tools/evaluate.py (lm-evaluation-harness) scores the pretrained checkpoint and the
#                  exported SFT model on a local hellaswag-schema sentence-completion task made from
#                  the corpus (so it measures what the model learned of its own text; chance is 25%)
#  10. report      tools/report.py: loss / LR / grad-norm / throughput charts and the scores, report.md
#
# Environment (all optional):
#   QUICKSTART_DIR      where everything goes (default: quickstart_out)
#   QUICKSTART_SIZE     "default" or "smallest" (CI: a tiny model, a few steps; checks plumbing, not learning)
#   PRETRAIN_CORPUS     your own JSONL/parquet (FineWeb-Edu schema, a "text" column) instead of the sample
#   SFT_DOLLY_JSONL     your own dolly-schema JSONL instead of the derived instruction set
#   QUESTION            the question asked at the end
#   CPU_PROCESSES       ranks on a machine without GPUs (default 2)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Installs what is missing (a .venv, torch, this package with its compiled parts); instant when done.
source "$REPO/scripts/setup.sh"
OUT="$(mkdir -p "${QUICKSTART_DIR:-quickstart_out}" && cd "${QUICKSTART_DIR:-quickstart_out}" && pwd)"
SIZE="${QUICKSTART_SIZE:-default}"
QUESTION="${QUESTION:-What does json.dumps do in Python?}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs" "$OUT/.done"

case "$SIZE" in
    default)
        MODEL=lime-mini VOCAB=4096 SEQ=256 MAX_POSITIONS=256
        PRETRAIN_ITERS=1000 PRETRAIN_EVAL_INTERVAL=200 SFT_ITERS=200
        MICRO=8 GLOBAL=16 LR=3e-3 MIN_LR=3e-5 SFT_LR=5e-4 SFT_MIN_LR=6e-5 SFT_EXAMPLES=3000 CORPUS_MB=8
        EVAL_SAMPLES=200
        ;;
    smallest)
        # 256 positions although it trains on 128: the card's generate call asks for 128 new tokens.
        MODEL=lime-tiny VOCAB=512 SEQ=128 MAX_POSITIONS=256
        PRETRAIN_ITERS=40 PRETRAIN_EVAL_INTERVAL=20 SFT_ITERS=10
        MICRO=4 GLOBAL=8 LR=3e-3 MIN_LR=3e-5 SFT_LR=5e-4 SFT_MIN_LR=6e-5 SFT_EXAMPLES=300 CORPUS_MB=0.4
        EVAL_SAMPLES=20
        ;;
    *) echo "QUICKSTART_SIZE must be 'default' or 'smallest', got '$SIZE'" >&2; exit 2 ;;
esac

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    HARDWARE="$(nvidia-smi -L | grep -c '^GPU') GPU(s)"
else
    HARDWARE="CPU, ${CPU_PROCESSES:-2} processes (gloo)"
fi

TOTAL_START=$(date +%s)

# progress_lines LABEL: the trainer's log lines (on stdin) condensed to iteration, loss, tokens/s and
# time left, plus each validation loss. On a terminal one line updates in place; elsewhere (a log,
# CI) a line every 10% of the steps. A bash read loop: it sees each line as soon as it is written
# (awk may wait to fill its input buffer).
progress_lines() {
    local label line shown tty=0 open=0 every=0 next_shown=0 loss speed left
    label="$(printf '[%-10s]' "$1")"
    [[ -t 1 ]] && tty=1
    local step_re='iteration +([0-9]+)/ *([0-9]+) \|' loss_re='lm loss ([0-9.eE+-]+)'
    local speed_re='tokens/s ([0-9]+)' left_re='time left ([0-9:]+)'
    local valid_re='validation loss at iteration ([0-9]+) \| lm loss value: ([0-9.eE+-]+)'
    while IFS= read -r line; do
        if [[ $line =~ $step_re ]]; then
            local step=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
            loss=? speed=? left=?
            [[ $line =~ $loss_re ]] && loss=$(printf '%.3f' "${BASH_REMATCH[1]}")
            [[ $line =~ $speed_re ]] && speed=${BASH_REMATCH[1]}
            [[ $line =~ $left_re ]] && left=${BASH_REMATCH[1]}
            shown="$label   iteration $step/$total | loss $loss | $speed tokens/s | time left $left"
            if (( every == 0 )); then every=$(( total / 10 > 0 ? total / 10 : 1 )); next_shown=$every; fi
            if (( tty )); then
                printf '\r%s\033[K' "$shown"; open=1
            elif (( step >= next_shown || step == total )); then
                echo "$shown"
                while (( next_shown <= step )); do next_shown=$(( next_shown + every )); done
            fi
        elif [[ $line =~ $valid_re ]]; then
            shown="$label   validation loss $(printf '%.3f' "${BASH_REMATCH[2]}") at iteration ${BASH_REMATCH[1]}"
            if (( tty )); then printf '\r%s\033[K\n' "$shown"; open=0; else echo "$shown"; fi
        fi
    done
    if (( tty && open )); then echo; fi
}

# run_stage [--progress] NAME DESCRIPTION OUTPUT COMMAND...: skipped when .done/NAME exists; logs to
# logs/NAME.log; --progress also shows the training's progress (progress_lines) while it runs.
run_stage() {
    local progress=0
    [[ "$1" == --progress ]] && { progress=1; shift; }
    local name=$1 description=$2 output=$3
    shift 3
    local log="$OUT/logs/$name.log"
    if [[ -f "$OUT/.done/$name" ]]; then
        printf '[%-10s] skipped: done in an earlier run (%s); remove %s to redo it\n' "$name" "$output" "$OUT/.done/$name"
        return 0
    fi
    printf '[%-10s] %s ...\n' "$name" "$description"
    local start=$(date +%s) status=0
    if (( progress )); then
        "$@" 2>&1 | tee "$log" | progress_lines "$name"
        status=${PIPESTATUS[0]}
    else
        "$@" >"$log" 2>&1 || status=$?
    fi
    if (( status != 0 )); then
        printf '[%-10s] FAILED after %ss. The end of its log (%s):\n' "$name" "$(( $(date +%s) - start ))" "$log" >&2
        tail -n 25 "$log" | sed 's/^/    /' >&2
        echo "quickstart stopped at stage '$name'; fix the cause and re-run: completed stages are skipped." >&2
        exit 1
    fi
    touch "$OUT/.done/$name"
    printf '[%-10s] done in %ss -> %s\n' "$name" "$(( $(date +%s) - start ))" "$output"
}

echo "megatron-lime quickstart: $MODEL on $HARDWARE, output in $OUT"

# 1. data ---------------------------------------------------------------------------------------
PRETRAIN_CORPUS="${PRETRAIN_CORPUS:-$OUT/data/pretrain.jsonl}"
SFT_DOLLY_JSONL="${SFT_DOLLY_JSONL:-$OUT/data/sft_dolly.jsonl}"
run_stage data "writing the sample corpus from the standard library's docstrings" "$OUT/data" \
    python "$REPO/tools/make_sample_data.py" --output-dir "$OUT/data" \
        --max-megabytes "$CORPUS_MB" --max-sft-examples "$SFT_EXAMPLES"
grep -h -E '^(pretraining|instruction)' "$OUT/logs/data.log" | sed 's/^/             /'

# 2. tokenizer ----------------------------------------------------------------------------------
run_stage tokenizer "training a $VOCAB-entry sentencepiece tokenizer" "$OUT/tokenizer" \
    python "$REPO/tools/train_tokenizer.py" --input "$PRETRAIN_CORPUS" --json-key text \
        --vocab-size "$VOCAB" --output-dir "$OUT/tokenizer"

# 3. preprocess ---------------------------------------------------------------------------------
run_stage preprocess "tokenising the corpus into Megatron .bin/.idx" "$OUT/data/sample_text_document.{bin,idx}" \
    python "$REPO/tools/preprocess_data.py" --input "$PRETRAIN_CORPUS" --json-keys text \
        --tokenizer-model "$OUT/tokenizer" --output-prefix "$OUT/data/sample" --append-eod --workers 2
tail -n 1 "$OUT/logs/preprocess.log" | sed 's/^/             /'

# 4. pretrain -----------------------------------------------------------------------------------
COMMON_TRAIN_ARGS=(
    --model "$MODEL" --vocab-size "$VOCAB" --seq-length "$SEQ" --max-position-embeddings "$MAX_POSITIONS"
    --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL"
    --log-interval 10 --eval-iters 4 --num-workers 0
    --tensorboard-dir "$OUT/tensorboard"
)
run_stage --progress pretrain "pretraining $MODEL for $PRETRAIN_ITERS steps with deepspeed on $HARDWARE" "$OUT/checkpoints/pretrain" \
    env MASTER_PORT="${MASTER_PORT:-29511}" SAVE_DIR="$OUT/checkpoints/pretrain" \
        DATA_PATH="$OUT/data/sample_text_document" TOKENIZER_MODEL="$OUT/tokenizer" \
    bash "$REPO/examples/pretrain_lime_1b.sh" "${COMMON_TRAIN_ARGS[@]}" --split 98,2,0 \
        --train-iters "$PRETRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" \
        --eval-interval "$PRETRAIN_EVAL_INTERVAL" --save-interval "$PRETRAIN_ITERS"

# 5. sft-data -----------------------------------------------------------------------------------
cat > "$OUT/data/sft_mixture.yaml" <<EOF
# The quickstart's instruction set, read by the databricks-dolly-15k adapter (its schema).
seed: 1234
seq_length: $SEQ
over_length: truncate
datasets:
  - name: databricks/databricks-dolly-15k
    path: $SFT_DOLLY_JSONL
EOF
run_stage sft-data "tokenising the instruction set with the <user>/<assistant> template and loss mask" \
    "$OUT/data/sft_{text,loss_mask}_document.{bin,idx}" \
    python "$REPO/tools/preprocess_sft_data.py" --mixture "$OUT/data/sft_mixture.yaml" \
        --tokenizer "$OUT/tokenizer" --output-prefix "$OUT/data/sft" --seq-length "$SEQ" --quiet
grep -E '^total' "$OUT/logs/sft-data.log" | sed 's/^/             /'

# 6. sft ----------------------------------------------------------------------------------------
run_stage --progress sft "instruction-tuning for $SFT_ITERS steps (packed, prompt masked)" "$OUT/checkpoints/sft" \
    env MASTER_PORT="${MASTER_PORT:-29512}" SAVE_DIR="$OUT/checkpoints/sft" PRETRAINED="$OUT/checkpoints/pretrain" \
        DATA_PATH="$OUT/data/sft_text_document" TOKENIZER_MODEL="$OUT/tokenizer" SFT_ITERS="$SFT_ITERS" \
    bash "$REPO/examples/sft_lime_1b.sh" "${COMMON_TRAIN_ARGS[@]}" --split 95,5,0 \
        --lr "$SFT_LR" --min-lr "$SFT_MIN_LR" --eval-interval "$SFT_ITERS" --save-interval "$SFT_ITERS"

# 7. convert ------------------------------------------------------------------------------------
run_stage convert "exporting to a Hugging Face folder" "$OUT/hf" \
    python "$REPO/tools/convert_to_hf.py" --load "$OUT/checkpoints/sft" --tokenizer "$OUT/tokenizer" \
        --output "$OUT/hf" --dtype bf16 --overwrite

# 8. generate -----------------------------------------------------------------------------------
# Not a stage with a marker: answering the question is the point, so it always runs.
echo "[generate  ] loading $OUT/hf with transformers as the model card does, and asking: $QUESTION"
GENERATE_START=$(date +%s)
if ! python "$REPO/examples/card_generate.py" "$OUT/hf" "$QUESTION" > "$OUT/logs/generate.log" 2>&1; then
    echo "[generate  ] FAILED. The end of its log ($OUT/logs/generate.log):" >&2
    tail -n 25 "$OUT/logs/generate.log" | sed 's/^/    /' >&2
    exit 1
fi
grep -E '^(question|answer)' "$OUT/logs/generate.log" | sed 's/^/             /'
echo "[generate  ] done in $(( $(date +%s) - GENERATE_START ))s"

# 9. evaluate -----------------------------------------------------------------------------------
evaluate_models() {
    python -m megatron_lime.evaluation.sample_tasks --corpus "$PRETRAIN_CORPUS" --output-dir "$OUT/eval/data" \
        --num-samples "$EVAL_SAMPLES" &&
    python "$REPO/tools/evaluate.py" --load "$OUT/checkpoints/pretrain" --tasks hellaswag --batch-size 16 \
        --data-dir "$OUT/eval/data" --output "$OUT/eval/pretrain.json" &&
    python "$REPO/tools/evaluate.py" --load "$OUT/hf" --tasks hellaswag --batch-size 16 \
        --data-dir "$OUT/eval/data" --output "$OUT/eval/sft_hf.json"
}
run_stage evaluate "scoring the pretrained and the exported model with lm-eval on $EVAL_SAMPLES local sentence completions" \
    "$OUT/eval/{pretrain,sft_hf}.json" evaluate_models

# 10. report ------------------------------------------------------------------------------------
run_stage report "charting the runs (loss, LR, grad norm, throughput) and the scores" "$OUT/report/report.md" \
    python "$REPO/tools/report.py" "$OUT/checkpoints/pretrain" "$OUT/checkpoints/sft" \
        "$OUT/eval/pretrain.json" "$OUT/eval/sft_hf.json" --output "$OUT/report"

# Summary ---------------------------------------------------------------------------------------
python "$REPO/examples/quickstart_summary.py" "$OUT" "$VOCAB"
echo "quickstart finished in $(( $(date +%s) - TOTAL_START ))s (stages skipped from earlier runs not counted)"
