# Sourced by examples/pretrain_lime_1b.sh and examples/sft_lime_1b.sh once they have filled
# ALL_ARGS; not meant to be run on its own. `launch_or_print_args SCRIPT "$@"`:
#   SCRIPT --print-args       prints ALL_ARGS NUL-separated (what the script's Python part asks
#                             for on every rank: megatron_lime/training/launch.py)
#   anything else             starts DeepSpeed's launcher on SCRIPT with the arguments given:
#                             HOSTFILE when set; else every local GPU; else CPU_PROCESSES (default
#                             2) CPU processes with gloo
launch_or_print_args() {
    local script=$1
    shift
    if [[ "${1:-}" == "--print-args" ]]; then
        printf '%s\0' "${ALL_ARGS[@]}"
        exit 0
    fi
    local launcher num_gpus
    if [[ -n "${HOSTFILE:-}" ]]; then
        launcher=(deepspeed --hostfile "$HOSTFILE")
    elif num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [[ "$num_gpus" -gt 0 ]]; then
        launcher=(deepspeed --num_gpus "$num_gpus")
    else
        export DS_ACCELERATOR=cpu     # DeepSpeed's CPU accelerator; the loop uses gloo
        launcher=(deepspeed --num_gpus "${CPU_PROCESSES:-2}")
    fi
    exec "${launcher[@]}" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
}
