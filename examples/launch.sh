# Sourced by examples/pretrain_lime_1b.sh and examples/sft_lime_1b.sh once they have filled their
# flag arrays (MODEL_ARGS, TRAINING_ARGS, DATA_ARGS, CHECKPOINT_ARGS, LOGGING_ARGS); not meant to be
# run on its own. `launch_or_print_args SCRIPT "$@"`:
#   SCRIPT --print-args [OVERRIDES]  prints the arrays' flags NUL-separated (what the script's Python part
#                             asks for on every rank; it passes the overrides, so that the script can
#                             leave out what they decide, such as its --precision)
#   anything else             starts the ranks on SCRIPT with the arguments given:
#                             HOSTFILE set: DeepSpeed's multi-node launcher (pdsh) over the hosts;
#                             else megatron_lime/training/launch.py on this node, on every local GPU,
#                             or CPU_PROCESSES (default 2) CPU processes with gloo. That launcher
#                             forwards SIGTERM/SIGINT to the ranks and waits for their checkpoint
#                             (the stock ones SIGKILL the ranks 30 s after a SIGTERM), and stops
#                             every rank when one fails.
# Each script is bash and Python at once: to Python the bash part is one string, and bash exits in
# launch_or_print_args before it reaches the Python part. A launcher (ours or `deepspeed`) runs the
# script with python on every rank; its Python part calls
# megatron_lime.training.pretrain.train_with_script_flags, which asks bash for the flags (so they are
# written once, in the arrays) and trains with them followed by the command line's flags, which win
# because the last occurrence of a flag wins.
launch_or_print_args() {
    local script=$1
    shift
    if [[ "${1:-}" == "--print-args" ]]; then
        # The precision, unless the overrides name one (--precision, --bf16, --no-bf16: they win, as every
        # override): PRECISION, else the model card's "mixed fp32/bf16 (autocast)" on GPUs (fp32 weights,
        # gradients and AdamW, bf16 matmuls; PRECISION=bf16 is DeepSpeed's bf16 mode, about 3% faster by
        # benchmarks/step_cost.py) and fp32 without one (CPUs emulate bf16, about 27x slower).
        case " $* " in
            *" --precision"*|*" --bf16 "*|*" --no-bf16 "*) ;;
            *) local precision="${PRECISION:-}"
               if [[ -z "$precision" ]]; then
                   if nvidia-smi -L >/dev/null 2>&1; then precision=autocast; else precision=fp32; fi
               fi
               TRAINING_ARGS+=(--precision "$precision") ;;
        esac
        printf '%s\0' "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" \
            "${LOGGING_ARGS[@]}"
        exit 0
    fi
    if [[ -n "${HOSTFILE:-}" ]]; then
        exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
    fi
    local num_processes repo
    num_processes=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ "${num_processes:-0}" -eq 0 ]]; then
        export DS_ACCELERATOR=cpu     # DeepSpeed's CPU accelerator; the loop uses gloo
        num_processes=${CPU_PROCESSES:-2}
    fi
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    exec python "$repo/megatron_lime/training/launch.py" --nproc-per-node "$num_processes" \
        --master-port "${MASTER_PORT:-29500}" "$script" "$@"
}
