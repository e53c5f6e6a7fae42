"""Pretraining and instruction tuning with DeepSpeed ZeRO-1 + bf16 (see README.md here). The top layer of the
package: it may import every other one, and nothing imports it (ARCHITECTURE.md).

    config.py         TrainArgs and its sections (flags generated with Megatron's names), recipes
    distributed.py    the process group: init_distributed (NCCL on GPUs, gloo on CPU), DistEnv, all_reduce_sum
    data.py           datasets and the sample order (data position = consumed samples)
    wrap.py           activation checkpointing -> torch.compile -> deepspeed.initialize (one place), kernel plan
    schedule.py       lr_at(step, ...): warmup then polynomial / cosine / constant
    checkpointing.py  what a save holds and when (Checkpointer); restore(): where a run starts from --load;
                      the format is megatron_lime/checkpoint/
    metrics.py        log line (StepWindow -> StepMetrics), TensorBoard / W&B, MFU, goodput
    evaluators.py     what the loop evaluates: validation loss and lm-eval task scores, one maybe_run seam
    failures.py       how a rank ends: errors, signals, the process group (run_guarded); fault injection
    launch.py         the per-node launcher (standard library only)
    pretrain.py       main(argv): the loop and its step
"""
