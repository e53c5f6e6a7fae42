"""The command line of pretrain_lime.py / examples/*.sh is frozen: a flag that appears or
vanishes must be a decision (update FROZEN_FLAGS here), never an accident."""

import pytest

from megatron_lime.training.config import build_parser, parse_training_args

FROZEN_FLAGS = sorted([
    "--help", "--model", "--recipe", "--local_rank", "--local-rank",
    # model (LimeConfig)
    "--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size", "--vocab-size",
    "--max-position-embeddings", "--norm-eps", "--init-std", "--attention-backend",
    "--loss-chunk-size",
    # training
    "--micro-batch-size", "--global-batch-size", "--seq-length", "--train-iters", "--train-tokens", "--seed",
    "--clip-grad", "--bf16", "--no-bf16", "--precision", "--zero-stage", "--deepspeed-config",
    "--recompute-activations", "--no-recompute-activations", "--torch-compile", "--no-torch-compile",
    "--max-skipped", "--exit-interval",
    # optimizer and schedule
    "--lr", "--min-lr", "--lr-warmup-iters", "--lr-warmup-fraction", "--lr-decay-style", "--lr-decay-power",
    "--lr-decay-iters", "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-eps",
    # data
    "--data-path", "--split", "--data-cache-path", "--tokenizer-model", "--tokenizer-type", "--vocab-file",
    "--merge-file", "--dataset-type", "--sft-packing", "--no-sft-packing", "--num-workers",
    # checkpoints
    "--save", "--load", "--save-interval", "--finetune", "--no-finetune", "--keep-last",
    "--universal-checkpoint", "--no-universal-checkpoint", "--override-lr-scheduler", "--no-override-lr-scheduler",
    # logging
    "--log-interval", "--eval-interval", "--eval-iters", "--tensorboard-dir", "--wandb-project",
    "--wandb-exp-name", "--peak-tflops",
    "--eval-tasks", "--eval-tasks-interval", "--eval-tasks-limit", "--eval-tasks-data-dir",
])


def test_flag_set_is_frozen():
    parser = build_parser()
    flags = sorted(o for action in parser._actions for o in action.option_strings if o.startswith("--"))
    assert flags == FROZEN_FLAGS


def test_recipe_then_user_flags_win():
    base = ["--model", "lime-tiny", "--train-iters", "10"]
    pretrain = parse_training_args(base)
    assert ((pretrain.optimizer.lr, pretrain.optimizer.min_lr, pretrain.optimizer.lr_warmup_fraction)
            == (5e-4, 5e-6, 0.05))
    assert ((pretrain.optimizer.adam_beta1, pretrain.optimizer.adam_beta2, pretrain.optimizer.adam_eps)
            == (0.9, 0.95, 1e-8))
    assert pretrain.optimizer.weight_decay == 0.1 and pretrain.training.clip_grad == 1.0
    sft = parse_training_args(base + ["--recipe", "sft"])
    assert (sft.optimizer.lr, sft.optimizer.min_lr, sft.optimizer.lr_warmup_fraction) == (8e-5, 1e-5, 0.10)
    assert sft.data.dataset_type == "sft"
    overridden = parse_training_args(base + ["--recipe", "sft", "--lr", "1e-4", "--lr-warmup-iters", "3"])
    assert overridden.optimizer.lr == 1e-4
    assert overridden.optimizer.lr_warmup_iters == 3 and overridden.optimizer.lr_warmup_fraction is None
    # Later flags win (the example scripts append the user's overrides).
    assert parse_training_args(base + ["--lr", "1e-3", "--lr", "2e-3"]).optimizer.lr == 2e-3


def test_of_two_ways_to_say_one_thing_the_last_wins():
    args = parse_training_args(["--model", "lime-tiny", "--train-tokens", "1000", "--train-iters", "20"])
    assert (args.training.train_iters, args.training.train_tokens) == (20, None)
    args = parse_training_args(["--model", "lime-tiny", "--train-iters", "20", "--train-tokens=1000"])
    assert (args.training.train_iters, args.training.train_tokens) == (None, 1000)
    args = parse_training_args(["--model", "lime-tiny", "--train-iters", "9", "--lr-warmup-iters", "5",
                                "--lr-warmup-fraction", "0.1"])
    assert (args.optimizer.lr_warmup_iters, args.optimizer.lr_warmup_fraction) == (None, 0.1)


def test_seq_length_sets_positions_and_model_flags_apply():
    args = parse_training_args(["--model", "lime-tiny", "--train-iters", "1", "--seq-length", "64",
                                "--num-layers", "3"])
    assert args.seq_length == 64 and args.model.max_position_embeddings == 64 and args.model.num_layers == 3
    args = parse_training_args(["--model", "lime-1b", "--train-tokens", "20000000000"])
    assert args.seq_length == 512 and args.model.hidden_size == 1536


@pytest.mark.parametrize("argv, message", [
    (["--train-iters", "1", "--micro-batch-size", "3", "--global-batch-size", "8"], "divisible by --micro-batch-size"),
    (["--micro-batch-size", "2"], "give --train-iters or --train-tokens"),
    (["--train-iters", "1", "--lr", "1e-5", "--min-lr", "1e-4"], "--min-lr"),
    (["--train-iters", "1", "--seq-length", "256", "--max-position-embeddings", "128"], "exceeds"),
])
def test_bad_flag_combinations_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_training_args(["--model", "lime-tiny", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_launcher_local_rank_parses_and_is_not_kept():
    """DeepSpeed's launcher appends --local_rank=N; the rank comes from LOCAL_RANK, so TrainArgs has no field for it."""
    args = parse_training_args(["--model", "lime-tiny", "--train-iters", "1", "--local_rank=1"])
    assert not hasattr(args, "local_rank")
    assert parse_training_args(["--model", "lime-tiny", "--train-iters", "1",
                                "--override-lr-scheduler"]).checkpoint.override_lr_scheduler is True
