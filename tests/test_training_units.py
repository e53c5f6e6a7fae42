"""Pure pieces of the training stack: LR schedule, batch arithmetic, DeepSpeed config,
parameter groups, sample order, consolidated checkpoints, MFU."""

import json
import math

import pytest
import torch

from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeModel
from megatron_lime.checkpoint import CheckpointError, LoadSource, resolve_load
from megatron_lime.checkpoint import read_consolidated as load_consolidated
from megatron_lime.checkpoint import write_consolidated as save_consolidated
from megatron_lime.training import checkpointing
from megatron_lime.training.config import CheckpointConfig, TrainingConfig, parse_training_args, train_iters
from megatron_lime.training.data import MicroBatchSampler
from megatron_lime.training.metrics import StepMetrics, peak_tflops_for
from megatron_lime.training.schedule import lr_at, lr_for_config, warmup_steps
from megatron_lime.training.wrap import build_deepspeed_config, parameter_groups


def test_polynomial_schedule_values():
    kw = dict(peak=5e-4, min_lr=5e-6, warmup=50, decay_steps=1000)
    assert lr_at(0, **kw) == pytest.approx(5e-4 / 50)
    assert lr_at(49, **kw) == pytest.approx(5e-4)  # warmup end: the peak
    assert lr_at(50, **kw) == pytest.approx(5e-4)  # decay starts at the peak
    assert lr_at(525, **kw) == pytest.approx(5e-6 + (5e-4 - 5e-6) * 0.5)  # mid-decay, linear (power 1)
    assert lr_at(525, **kw, power=2.0) == pytest.approx(5e-6 + (5e-4 - 5e-6) * 0.25)
    assert lr_at(999, **kw) == pytest.approx(5e-6 + (5e-4 - 5e-6) / 950)
    assert lr_at(1000, **kw) == 5e-6 and lr_at(5000, **kw) == 5e-6  # end: the minimum, held
    values = [lr_at(s, **kw) for s in range(50, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_and_constant_schedules():
    kw = dict(peak=1.0, min_lr=0.1, warmup=10, decay_steps=110)
    assert lr_at(60, **kw, style="cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10, **kw, style="cosine") == pytest.approx(1.0)
    assert lr_at(110, **kw, style="cosine") == pytest.approx(0.1)
    assert lr_at(4, **kw, style="constant") == pytest.approx(0.5)
    assert lr_at(100, **kw, style="constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr decay style"):
        lr_at(50, **kw, style="exponential")


def test_card_recipe_schedule_over_the_20b_token_run():
    args = parse_training_args(["--model", "lime-1b", "--train-tokens", "20000000000",
                                "--global-batch-size", "512", "--micro-batch-size", "16"])
    steps = train_iters(args)
    assert steps == math.ceil(20e9 / (512 * 512)) == 76294
    assert warmup_steps(args.optimizer, steps) == round(0.05 * 76294) == 3815
    assert lr_for_config(3814, args.optimizer, steps) == pytest.approx(5e-4)
    assert lr_for_config(steps, args.optimizer, steps) == pytest.approx(5e-6)
    sft = parse_training_args(["--model", "lime-1b", "--train-iters", "1000", "--recipe", "sft"])
    assert warmup_steps(sft.optimizer, 1000) == 100
    assert lr_for_config(99, sft.optimizer, 1000) == pytest.approx(8e-5)
    assert lr_for_config(550, sft.optimizer, 1000) == pytest.approx(1e-5 + (8e-5 - 1e-5) * 0.5)


def test_batch_arithmetic():
    training = TrainingConfig(micro_batch_size=16, global_batch_size=512, train_iters=1)
    assert training.gradient_accumulation_steps(8) == 4
    assert training.gradient_accumulation_steps(16) == 2
    with pytest.raises(ValueError, match=r"divisible by --micro-batch-size \(16\) x data-parallel size \(3\) = 48"):
        training.gradient_accumulation_steps(3)
    with pytest.raises(ValueError, match="must be divisible by --micro-batch-size"):
        TrainingConfig(micro_batch_size=3, global_batch_size=512, train_iters=1)


def test_deepspeed_config_comes_from_the_flags():
    args = parse_training_args(["--model", "lime-tiny", "--train-iters", "1", "--micro-batch-size", "2",
                                "--global-batch-size", "8", "--clip-grad", "0.5"])
    with open("examples/ds_config_zero1_bf16.json") as handle:
        example = json.load(handle)
    config = build_deepspeed_config(args, data_parallel_size=2, precision="fp32", base=example)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (8, 2, 2)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is False
    assert config["torch_autocast"]["enabled"] is False
    assert config["zero_optimization"]["stage"] == 1
    assert config["zero_optimization"]["reduce_bucket_size"] == example["zero_optimization"]["reduce_bucket_size"]
    with pytest.raises(ValueError, match="train_batch_size=64 but the flags give 8"):
        build_deepspeed_config(args, 2, "fp32", base={"train_batch_size": 64})
    with pytest.raises(ValueError, match="may not set 'optimizer'"):
        build_deepspeed_config(args, 2, "fp32", base={"optimizer": {"type": "Adam"}})
    bf16 = build_deepspeed_config(args, 2, "bf16", base=example)
    assert bf16["bf16"]["enabled"] is True and bf16["torch_autocast"]["enabled"] is False
    autocast = build_deepspeed_config(args, 2, "autocast", base=example)
    assert autocast["bf16"]["enabled"] is False
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_precision_flags(capsys):
    def precision(*flags: str) -> str | None:
        return parse_training_args(["--model", "lime-tiny", "--train-iters", "1", *flags]).training.precision

    assert precision() is None
    assert precision("--bf16") == "bf16" and precision("--no-bf16") == "fp32"
    assert precision("--precision", "autocast") == "autocast"
    assert precision("--bf16", "--precision", "bf16") == "bf16"
    with pytest.raises(SystemExit):
        precision("--no-bf16", "--precision", "autocast")
    assert "--no-bf16 contradicts --precision autocast" in capsys.readouterr().err


def test_weight_decay_groups():
    model = LimeModel(LimeConfig.from_name("lime-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in decayed and "layers.0.attention.qkv.weight" in decayed
    assert not_decayed == {"final_norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2)
                                                    for n in ("attn_norm", "mlp_norm")}
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))


def test_sampler_keeps_the_global_batch_whatever_the_data_parallel_size():
    def step_samples(world, micro, consumed, total=48):
        per_rank = [list(MicroBatchSampler(total, consumed, micro, r, world)) for r in range(world)]
        return per_rank

    two = step_samples(2, 2, 0)
    assert two[0][:2] == [[0, 1], [4, 5]] and two[1][:2] == [[2, 3], [6, 7]]
    # Global batch 8: step 3 covers samples 24..31 at world size 2 or 1.
    one = step_samples(1, 2, 24)
    assert sorted(i for mb in one[0][:4] for i in mb) == list(range(24, 32))
    assert sorted(i for r in range(2) for mb in step_samples(2, 2, 24)[r][:2] for i in mb) == list(range(24, 32))


def test_consolidated_round_trip(tmp_path):
    config = LimeConfig.from_name("lime-tiny")
    model = LimeModel(config)
    save_consolidated(str(tmp_path), model, {"model": config.to_dict(), "iteration": 7})
    state_dict, meta = load_consolidated(str(tmp_path))
    assert meta["iteration"] == 7 and LimeConfig.from_dict(meta["model"]) == config
    assert set(state_dict) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(state_dict[name], tensor), name
    assert resolve_load(str(tmp_path), universal=False).kind == "consolidated"
    with pytest.raises(CheckpointError, match="neither a consolidated"):
        (tmp_path / "empty").mkdir()
        resolve_load(str(tmp_path / "empty"), universal=False)


def test_mfu_arithmetic():
    config = LimeConfig.from_name("lime-1b")
    metrics = StepMetrics(iteration=1, train_iters=1, consumed_samples=1, consumed_tokens=1, loss=1.0, lr=1.0,
                          grad_norm=1.0, ms_per_step=1.0, tokens_per_second=8 * 25_000.0, world_size=8,
                          flops_per_token=config.flops_per_token(512), peak_tflops=312.0, memory_gib=1.0,
                          memory_kind="allocated", skipped_in_window=0, skipped_total=0)
    assert metrics.tflops_per_device == pytest.approx(25_000 * 6.1986e9 / 1e12, rel=1e-4)
    assert metrics.mfu == pytest.approx(metrics.tflops_per_device / 312.0)
    assert "MFU 49.7%" in metrics.line()
    assert peak_tflops_for(torch.device("cpu")) is None and peak_tflops_for(torch.device("cpu"), 100.0) == 100.0


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    from megatron_lime.training.checkpointing import Checkpointer

    for step in (5, 10, 15, 20):
        complete_tag(tmp_path / f"global_step{step}")
    (tmp_path / "global_step3").mkdir()  # an interrupted save: the user's to inspect, never pruned
    (tmp_path / "global_step20_universal").mkdir()
    (tmp_path / "tensorboard").mkdir()
    checkpointer = Checkpointer(str(tmp_path), 5, 2, meta_base={}, ds_config={}, rank=0, world_size=1)
    checkpointer._prune(keep="global_step20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step15", "global_step20", "global_step20_universal",
                                                          "global_step3", "tensorboard"]


def complete_tag(tag_dir, meta=None):
    """A tag folder as a finished save leaves it (empty model states; enough for the layout rules)."""
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tag_dir / "lime_config.json").write_text(json.dumps(meta or {"model": {}}))


def test_the_cpu_memory_figure_counts_what_the_process_owns_not_the_files_it_maps(tmp_path):
    """A 20B-token .bin scanned through a memory map made rank 0 report 19 GiB (peak RSS, file pages included).
    Here a fresh process maps 96 MiB of a file and reads every page: its RSS grows by that much, the figure
    the log line reports does not; 96 MiB it allocates and frees again between two log lines are counted."""
    import subprocess
    import sys

    path = tmp_path / "mapped.bin"
    path.write_bytes(b"\x01" * (96 << 20))
    script = (
        "import mmap, time, numpy as np\n"
        "from megatron_lime.training.metrics import OWNED_MEMORY_PEAK, cpu_owned_memory_gib\n"
        "def rss(): return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
        "OWNED_MEMORY_PEAK.start()\n"
        "before, rss_before = cpu_owned_memory_gib(), rss()\n"
        f"f = open({str(path)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "assert int(np.frombuffer(m, dtype=np.uint8).sum()) == 96 << 20\n"
        "time.sleep(0.2)\n"
        "mapped, rss_mapped = cpu_owned_memory_gib(), rss()\n"
        "owned = np.ones(96 << 20, dtype=np.uint8)\n"
        "time.sleep(0.2)\n"
        "del owned\n"
        "print((mapped - before) * 1024, (rss_mapped - rss_before) / 1024, (cpu_owned_memory_gib() - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, stdout=subprocess.PIPE, text=True).stdout
    mapped_mib, rss_mib, allocated_mib = (float(v) for v in out.split())
    assert rss_mib > 90, "the file's pages were not resident: the test proves nothing"
    assert mapped_mib < 4
    assert 90 < allocated_mib < 110


def test_restore_checks_what_load_names_against_the_run(monkeypatch, tmp_path):
    """restore(): an empty --load directory starts from scratch (with a warning); a full resume must come from the
    same model and continue at the run's global batch; each refusal is one CheckpointError naming the checkpoint."""
    model = LimeConfig.from_name("lime-tiny").to_dict()
    said = []
    state = checkpointing.restore(None, None, CheckpointConfig(load=str(tmp_path)), model, {}, 8, said.append)
    assert state == checkpointing.TrainState() and "holds no checkpoint yet" in said[0]

    class Resuming:  # the Checkpointer's DeepSpeed load: the state a save at iteration 2 of 5-sample batches holds
        def resume(self, engine, source, weights_only, universal):
            return checkpointing.TrainState(iteration=2, consumed_samples=10, consumed_tokens=640)

    source = LoadSource("deepspeed", "/runs/a", tag="global_step2", meta={"model": model})
    monkeypatch.setattr(checkpointing, "find_load_source", lambda options, say: source)
    options = CheckpointConfig(load="/runs/a")
    assert checkpointing.restore(None, Resuming(), options, model, {}, 5, said.append).iteration == 2
    with pytest.raises(CheckpointError, match="/runs/a: the checkpoint at iteration 2 has consumed 10 samples; "
                                              "with --global-batch-size 8"):
        checkpointing.restore(None, Resuming(), options, model, {}, 8, said.append)
    with pytest.raises(CheckpointError, match="the checkpoint's model differs from this run's: num_layers"):
        checkpointing.restore(None, Resuming(), options, {**model, "num_layers": 3}, {}, 5, said.append)

