"""Pretraining and instruction tuning with DeepSpeed ZeRO-1 + bf16 (see README.md here).

    config.py         TrainArgs and its sections (flags generated with Megatron's names), recipes
    schedule.py       lr_at(step, ...): warmup then polynomial / cosine / constant
    wrap.py           activation checkpointing -> torch.compile -> deepspeed.initialize (one place)
    data.py           datasets and the sample order (data position = consumed samples)
    checkpointing.py  what a save holds and when (Checkpointer); the format is megatron_lime/checkpoint/
    metrics.py        log line, TensorBoard / W&B, MFU
    pretrain.py       main(argv): the loop
"""
