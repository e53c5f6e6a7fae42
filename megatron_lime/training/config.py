"""Training configuration: typed dataclasses, the card's recipes, and the command line.

Every field becomes a Megatron-named flag (`lr_warmup_fraction` -> `--lr-warmup-fraction`).
Precedence, lowest first: dataclass defaults < recipe (`--recipe pretrain|sft`) < user flags.
The model comes from `--model PRESET` with any LimeConfig flag (`--num-layers`, ...) on top;
`--seq-length` is the sample length and `--max-position-embeddings` follows it unless given.

    args = parse_training_args(["--model", "lime-tiny", "--train-iters", "20", ...])
    args.model.num_layers, args.optimizer.lr, args.training.global_batch_size, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Literal

from megatron_lime.arguments import add_dataclass_flags, dataclass_from_args
from megatron_lime.config import PRESETS, LimeConfig, param
from megatron_lime.tokenizer import TOKENIZER_ARG_HELP


@dataclass(kw_only=True)
class TrainingConfig:
    """Batch sizes, length of the run, precision and wrapping."""

    micro_batch_size: int = param(4, "Samples per device per forward/backward pass.")
    global_batch_size: int = param(
        512, "Samples per optimizer step over all devices (micro x accumulation x data-parallel).")
    seq_length: int | None = param(None, "Tokens per sample (default: the model's max_position_embeddings).")
    train_iters: int | None = param(None, "Optimizer steps in the run (give this or --train-tokens).")
    train_tokens: int | None = param(None, "Tokens in the run; steps = ceil(tokens / (global batch x seq length)).")
    seed: int = param(1234, "Seed of the weight initialisation and of every random generator.")
    clip_grad: float = param(1.0, "Clip the global gradient norm to this (0 disables).")
    bf16: bool | None = param(
        None, "Megatron's precision switch: --bf16 is --precision bf16, --no-bf16 is --precision fp32.")
    precision: Literal["bf16", "autocast", "fp32"] | None = param(
        None, "bf16: DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master copy in the optimizer); "
        "autocast: DeepSpeed's torch_autocast (fp32 weights, bf16 matmuls, gradients communicated in bf16), "
        "the model card's 'mixed fp32/bf16'; fp32: no reduced precision. Default: bf16 on GPUs that support "
        "it, fp32 on CPU.")
    zero_stage: int = param(1, "DeepSpeed ZeRO stage (1 shards the optimizer state over data-parallel ranks).")
    deepspeed_config: str | None = param(
        None, "A DeepSpeed JSON whose sections are kept; batch sizes, clipping and precision come from these "
        "flags.")
    recompute_activations: bool = param(False, "Activation checkpointing: recompute each block in the backward pass.")
    torch_compile: bool = param(False, "Compile the model with torch.compile before DeepSpeed wraps it.")
    max_skipped: int = param(
        10, "Stop (with a checkpoint) after more than this many consecutive steps with a NaN/inf loss.")
    exit_interval: int | None = param(None, "Save and exit when the iteration is a multiple of this.")

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0:
            raise ValueError(f"--micro-batch-size ({self.micro_batch_size}) and --global-batch-size "
                             f"({self.global_batch_size}) must be positive")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"--global-batch-size ({self.global_batch_size}) must be divisible by "
                             f"--micro-batch-size ({self.micro_batch_size})")
        if self.train_iters is not None and self.train_tokens is not None:
            raise ValueError("give --train-iters or --train-tokens, not both")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"--zero-stage must be 0, 1 or 2 (this stack keeps whole weights per rank), "
                             f"got {self.zero_stage}")
        if self.clip_grad < 0 or self.max_skipped < 0:
            raise ValueError("--clip-grad and --max-skipped must be non-negative")
        if self.bf16 is not None:  # one source of truth from here on: precision
            implied = "bf16" if self.bf16 else "fp32"
            if self.precision is not None and self.precision != implied:
                raise ValueError(f"--{'' if self.bf16 else 'no-'}bf16 contradicts --precision {self.precision}: "
                                 f"give one of them")
            self.precision, self.bf16 = implied, None

    def gradient_accumulation_steps(self, data_parallel_size: int) -> int:
        """Micro-batches per step per rank; a clear error when the batch sizes do not divide."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size ({self.global_batch_size}) must be divisible by --micro-batch-size "
                f"({self.micro_batch_size}) x data-parallel size ({data_parallel_size}) = {per_step}")
        return self.global_batch_size // per_step


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW and the learning-rate schedule (linear warmup, then decay to --min-lr)."""

    lr: float = param(5e-4, "Peak learning rate, reached at the end of warmup.")
    min_lr: float = param(5e-6, "Learning rate at the end of the decay.")
    lr_warmup_iters: int | None = param(None, "Warmup steps (or give --lr-warmup-fraction).")
    lr_warmup_fraction: float | None = param(None, "Warmup as a fraction of the decay steps.")
    lr_decay_style: Literal["polynomial", "linear", "cosine", "constant"] = param(
        "polynomial", "Shape of the decay after warmup (polynomial with power 1 is linear).")
    lr_decay_power: float = param(1.0, "Power of the polynomial decay.")
    lr_decay_iters: int | None = param(None, "Steps over which the LR decays (default: the whole run).")
    weight_decay: float = param(
        0.1, "AdamW decoupled weight decay on weight matrices and the embedding (never on norms or biases).")
    adam_beta1: float = param(0.9, "AdamW beta1.")
    adam_beta2: float = param(0.95, "AdamW beta2.")
    adam_eps: float = param(1e-8, "AdamW epsilon.")

    def __post_init__(self) -> None:
        if self.lr_warmup_iters is not None and self.lr_warmup_fraction is not None:
            raise ValueError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction <= 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}) and --lr > 0")
        if self.lr_decay_power <= 0:
            raise ValueError(f"--lr-decay-power must be positive, got {self.lr_decay_power}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the tokens come from."""

    data_path: list[str] | None = param(None, "Dataset prefixes, optionally weighted: 'PREFIX' or '0.7 A 0.3 B'.")
    split: str = param("969,30,1", "Train/valid/test proportions of the documents.")
    data_cache_path: str | None = param(None, "Directory for the cached sample indices.")
    tokenizer_model: str | None = param(None, TOKENIZER_ARG_HELP["tokenizer_model"])
    tokenizer_type: str | None = param(None, TOKENIZER_ARG_HELP["tokenizer_type"])
    vocab_file: str | None = param(None, TOKENIZER_ARG_HELP["vocab_file"])
    merge_file: str | None = param(None, TOKENIZER_ARG_HELP["merge_file"])
    dataset_type: Literal["gpt", "sft"] = param("gpt", "gpt: pretraining documents; sft: instruction data (packed).")
    sft_packing: bool = param(True, "Pack several SFT examples per sample (attention stays inside each).")
    num_workers: int = param(2, "DataLoader worker processes per rank.")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and resuming."""

    save: str | None = param(None, "Directory for checkpoints (global_step{N}/ and latest).")
    load: str | None = param(None, "Resume from a DeepSpeed save directory, or load weights from a consolidated one.")
    save_interval: int | None = param(None, "Save every this many steps (and always at the end and on SIGTERM/SIGINT).")
    finetune: bool = param(False, "With --load: weights only (fresh optimizer, step 0, no samples consumed).")
    keep_last: int | None = param(None, "Keep only the newest N checkpoints in --save.")
    universal_checkpoint: bool = param(
        False, "Load a universal checkpoint (made by ds_to_universal) to change the data-parallel size.")
    override_lr_scheduler: bool = param(
        False, "On resume, use this command line's LR schedule even if it differs from the checkpoint's "
        "(otherwise the run stops and lists the differences).")


@dataclass(kw_only=True)
class LoggingConfig:
    """Progress: stdout, TensorBoard, W&B; validation."""

    log_interval: int = param(10, "Print/log training metrics every this many steps.")
    eval_interval: int | None = param(1000, "Validate every this many steps (and at the end).")
    eval_iters: int = param(10, "Global batches per validation.")
    tensorboard_dir: str | None = param(None, "Write TensorBoard scalars here.")
    wandb_project: str | None = param(None, "Also log to this Weights & Biases project (needs wandb installed).")
    wandb_exp_name: str | None = param(None, "W&B run name.")
    peak_tflops: float | None = param(
        None, "Peak dense bf16 TFLOP/s of one device for MFU (default: from the GPU's name).")
    eval_tasks: list[str] | None = param(
        None, "lm-eval tasks to score during training (needs the eval extra), e.g. arc_easy piqa.")
    eval_tasks_interval: int | None = param(None, "Score --eval-tasks every this many steps.")
    eval_tasks_limit: int | None = param(None, "At most this many samples per task in each in-training evaluation.")
    eval_tasks_data_dir: str | None = param(
        None, "Offline task data for --eval-tasks: DIR/<hub dataset id>/ (as tools/evaluate.py --data-dir).")

    def __post_init__(self) -> None:
        if self.eval_tasks and not self.eval_tasks_interval:
            raise ValueError("--eval-tasks needs --eval-tasks-interval N")
        if self.eval_tasks_interval is not None and self.eval_tasks_interval <= 0:
            raise ValueError(f"--eval-tasks-interval must be positive, got {self.eval_tasks_interval}")


# The card's recipes. A recipe fills fields before user flags are applied.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "pretrain": {
        "optimizer": dict(lr=5e-4, min_lr=5e-6, lr_warmup_fraction=0.05, lr_decay_style="polynomial",
                          lr_decay_power=1.0, weight_decay=0.1),
        "data": dict(dataset_type="gpt"),
    },
    "sft": {
        "optimizer": dict(lr=8e-5, min_lr=1e-5, lr_warmup_fraction=0.10, lr_decay_style="polynomial",
                          lr_decay_power=1.0, weight_decay=0.1),
        "data": dict(dataset_type="sft", sft_packing=True),
    },
}

SECTIONS: dict[str, type] = {
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(kw_only=True)
class TrainArgs:
    """Everything a run needs, resolved (recipe and user flags applied)."""

    model: LimeConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    recipe: str

    @property
    def seq_length(self) -> int:
        return self.training.seq_length or self.model.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "model": self.model.to_dict(),
                **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain or fine-tune a LIME model with DeepSpeed (run under the deepspeed launcher).",
        allow_abbrev=False)
    parser.add_argument("--model", default="lime-1b", choices=list(PRESETS), help="Model preset (default: lime-1b).")
    parser.add_argument("--recipe", default="pretrain", choices=list(RECIPES),
                        help="The card's LR recipe and dataset type; flags given explicitly win (default: pretrain).")
    # DeepSpeed's launcher appends --local_rank=N, so the flag must parse; the value is not used,
    # since the same number is in the environment (LOCAL_RANK), which torchrun sets too.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="Set by the deepspeed launcher; ignored (LOCAL_RANK from the environment is used).")
    add_dataclass_flags(parser, LimeConfig, group="model")
    for name, cls in SECTIONS.items():
        add_dataclass_flags(parser, cls, group=name)
    return parser


EITHER_OR_FLAGS = (("train_iters", "train_tokens"), ("lr_warmup_iters", "lr_warmup_fraction"))


def _last_index(argv: list[str], dest: str) -> int:
    flag = "--" + dest.replace("_", "-")
    return max(i for i, arg in enumerate(argv) if arg == flag or arg.startswith(flag + "="))


def parse_training_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse the command line into TrainArgs; later flags win over earlier ones (so overrides go last)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    # Pairs that say the same thing two ways: the one given last wins, so an override appended
    # to a script's flags (`--train-iters 20` after the script's `--train-tokens`) replaces it.
    for first, second in EITHER_OR_FLAGS:
        if getattr(ns, first) is not None and getattr(ns, second) is not None:
            loser = first if _last_index(argv, first) < _last_index(argv, second) else second
            setattr(ns, loser, None)
    recipe = RECIPES[ns.recipe]
    model_base = LimeConfig.from_name(ns.model)
    if ns.seq_length is not None and ns.max_position_embeddings is None:
        model_base = dataclasses.replace(model_base, max_position_embeddings=ns.seq_length)
    try:
        model = dataclass_from_args(LimeConfig, ns, base=model_base)
        bases = {name: dict(recipe.get(name, {})) for name in SECTIONS}
        if ns.lr_warmup_iters is not None:  # warmup in steps replaces the recipe's fraction
            bases["optimizer"].pop("lr_warmup_fraction", None)
        sections = {name: dataclass_from_args(cls, ns, base=cls(**bases[name])) for name, cls in SECTIONS.items()}
        args = TrainArgs(model=model, recipe=ns.recipe, **sections)
    except ValueError as err:
        parser.error(str(err))
    if args.seq_length > args.model.max_position_embeddings:
        parser.error(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                     f"{args.model.max_position_embeddings}")
    if args.training.train_iters is None and args.training.train_tokens is None:
        parser.error("give --train-iters or --train-tokens")
    return args


def train_iters(args: TrainArgs) -> int:
    """Steps in the run: --train-iters, or --train-tokens divided by the tokens of one global batch."""
    if args.training.train_iters is not None:
        return args.training.train_iters
    tokens_per_step = args.training.global_batch_size * args.seq_length
    return -(-args.training.train_tokens // tokens_per_step)
