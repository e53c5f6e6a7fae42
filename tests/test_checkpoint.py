"""The checkpoint format (megatron_lime/checkpoint.py) under damage: bad `latest`, interrupted saves,
corrupt and malicious files, a changed LR schedule; in the format module, in conversion and in the trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import train_tiny
from megatron_lime import checkpoint
from megatron_lime.checkpoint import CheckpointError, resolve_load, torch_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    """Pickles as a call to os.system: loading it with weights_only=False would create `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def complete_tag(save_dir, step: int, meta: dict | None = None):
    tag_dir = save_dir / f"global_step{step}"
    tag_dir.mkdir(parents=True)
    torch.save({"module": {}}, tag_dir / checkpoint.MODEL_STATES)
    (tag_dir / checkpoint.LIME_CONFIG).write_text(json.dumps(meta or {"model": {}}))
    return tag_dir


# ----------------------------------------------------------------------------------------------
# Resolving what to load


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"), (b"\n  \n", "empty"), (b"\xff\xfe\x00garbage", "not text"),
    (b"../../etc", "is not a tag name"), (b"global_step2\nglobal_step4", "is not a tag name"),
])
def test_empty_or_garbage_latest_is_one_clear_error(tmp_path, content, reason):
    complete_tag(tmp_path, 2)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as raised:
        resolve_load(str(tmp_path))
    assert str(tmp_path / "latest") in str(raised.value) and "\n" not in str(raised.value)


def test_a_tag_missing_its_files_is_named(tmp_path):
    tag_dir = complete_tag(tmp_path, 2)
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match="'global_step9' does not exist .*complete tags: global_step2"):
        resolve_load(str(tmp_path))
    (tmp_path / "latest").write_text("global_step2")
    (tag_dir / checkpoint.MODEL_STATES).unlink()
    with pytest.raises(CheckpointError, match=f"{tag_dir}: tag 'global_step2' has no mp_rank_00_model_states.pt"):
        resolve_load(str(tmp_path))


def test_an_interrupted_save_never_blocks_a_start(tmp_path, caplog):
    # kill -9 during the very first save: global_step10/ holds some files but no completion marker.
    partial = tmp_path / "global_step10"
    partial.mkdir()
    torch.save({"module": {}}, partial / checkpoint.MODEL_STATES)
    assert not checkpoint.holds_checkpoint(str(tmp_path))  # the trainer starts from scratch
    assert "global_step10: ignored: an interrupted save" in caplog.text
    with pytest.raises(CheckpointError, match="global_step10 are interrupted saves"):
        resolve_load(str(tmp_path))
    # A later complete save wins; without `latest` (killed between marker and latest) the newest complete tag is used.
    complete_tag(tmp_path, 5)
    assert resolve_load(str(tmp_path)).tag == "global_step5"
    complete_tag(tmp_path, 20)
    (tmp_path / "global_step30").mkdir()
    assert resolve_load(str(tmp_path)).tag == "global_step20"


def test_latest_only_ever_names_a_complete_tag(tmp_path):
    (tmp_path / "global_step4").mkdir()
    with pytest.raises(CheckpointError, match="not complete"):
        checkpoint.write_latest(str(tmp_path), "global_step4")
    assert not (tmp_path / "latest").exists()
    complete_tag(tmp_path, 6)
    checkpoint.write_latest(str(tmp_path), "global_step6")
    assert checkpoint.read_latest(str(tmp_path)) == "global_step6"


# ----------------------------------------------------------------------------------------------
# Loading files: no pickled code runs


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": RunsCode(str(marker))}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to load: it holds (posix|nt)\.system"):
        torch_load(evil)
    with checkpoint.deepspeed_loads_safely(), pytest.raises(CheckpointError, match="refused"):
        torch.load(evil, weights_only=False)  # what DeepSpeed's readers call
    assert torch.load is checkpoint._torch_load  # the patch ends with the block
    assert not marker.exists()


def test_corrupt_pt_and_safetensors_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable PyTorch file"):
        torch_load(garbage)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable PyTorch file"):
        torch_load(truncated)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxxxx")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        checkpoint.load_safetensors(bad)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from megatron_lime.training.checkpointing import rng_state, set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch_load(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_files_of_earlier_checkpoints_still_resume_and_stay_safe(tmp_path):
    # Before RNG states were tensors, the files held random.getstate() and np.random.get_state() (a numpy array).
    import random

    import numpy as np

    from megatron_lime.training.checkpointing import load_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "rng_state_rank0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_rng_state(str(tmp_path / "rng_state_rank0.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

    # Allowing numpy arrays does not let an object array's items run code.
    marker = tmp_path / "pwned"
    torch.save({"python": random.getstate(), "numpy": np.array([RunsCode(str(marker))], dtype=object)},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused to load: it holds"):
        load_rng_state(str(tmp_path / "evil.pt"))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Conversion: one line naming the file, no traceback, exit 1


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "tools/convert_to_hf.py", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_conversion_refuses_damaged_and_malicious_checkpoints(tmp_path):
    from megatron_lime.config import LimeConfig

    meta = {"model": LimeConfig.from_name("lime-tiny").to_dict(), "tokenizer": "unused"}
    save = tmp_path / "save"
    tag_dir = complete_tag(save, 2, meta)
    out = str(tmp_path / "hf")
    (save / "latest").write_text("")
    assert f"{save / 'latest'}: empty" in error_line(convert_cli("--load", str(save), "--output", out))
    (save / "latest").write_text("global_step2")
    (tag_dir / checkpoint.MODEL_STATES).write_bytes(b"garbage")
    assert f"{tag_dir / checkpoint.MODEL_STATES}: not a readable PyTorch file" in \
        error_line(convert_cli("--load", str(save), "--output", out))
    # Malicious model states, and an optimizer shard so that DeepSpeed's zero_to_fp32 does the loading.
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "x": RunsCode(str(marker))}, tag_dir / checkpoint.MODEL_STATES)
    shutil.copy(tag_dir / checkpoint.MODEL_STATES, tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "refused to load: it holds" in error_line(convert_cli("--load", str(save), "--output", out))
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert "refused to load: it holds" in error_line(convert_cli("--load", str(save), "--output", out))
    assert not marker.exists()
    consolidated = tmp_path / "consolidated"
    consolidated.mkdir()
    (consolidated / "lime_config.json").write_text(json.dumps(meta))
    (consolidated / "model.safetensors").write_bytes(b"\x00" * 12)
    assert f"{consolidated / 'model.safetensors'}: not a readable safetensors file" in \
        error_line(convert_cli("--load", str(consolidated), "--output", out))
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# The trainer: interrupted first save, changed schedule, malicious files, bad `latest`


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import make_tiny_pretraining_data

    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")), num_docs=60)


def test_trainer_resume_safety(tiny_data, tmp_path):
    save = tmp_path / "save"
    # An interrupted very first save (kill -9 leaves global_step2/ without its marker) does not block the start.
    (save / "global_step2").mkdir(parents=True)
    (save / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    first = train_tiny(tiny_data, save, "--exit-interval", "2")
    assert first.returncode == 0, first.stdout[-4000:]
    assert "global_step2: ignored: an interrupted save" in first.stdout
    assert (save / "latest").read_text() == "global_step2" and checkpoint.is_complete(str(save / "global_step2"))
    assert json.loads((save / "global_step2" / "lime_config.json").read_text())["schedule"]["train_iters"] == 4

    # A changed schedule stops the resume, listing every difference; --override-lr-scheduler continues.
    changed = train_tiny(tiny_data, save, "--exit-interval", "3", "--train-iters", "6", "--lr", "1e-3")
    assert changed.returncode != 0
    assert "the learning-rate schedule differs from the checkpoint's: train_iters: checkpoint 4, now 6" \
        in changed.stdout and "lr: checkpoint 0.0005, now 0.001" in changed.stdout
    assert "lr_decay_iters: checkpoint 4, now 6" in changed.stdout
    assert (save / "latest").read_text() == "global_step2"
    backup = tmp_path / "backup"
    shutil.copytree(save, backup)
    overridden = train_tiny(tiny_data, save, "--exit-interval", "3", "--train-iters", "6", "--lr", "1e-3",
                       "--override-lr-scheduler")
    assert overridden.returncode == 0, overridden.stdout[-4000:]
    assert "--override-lr-scheduler: the new learning-rate schedule applies" in overridden.stdout
    assert "loaded" in overridden.stdout and "iteration 2" in overridden.stdout

    # Malicious RNG state and optimizer shard: refused by name, nothing runs.
    marker = tmp_path / "pwned"
    for name in ("rng_state_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        shutil.rmtree(save)
        shutil.copytree(backup, save)
        torch.save({"torch": torch.ones(1), "x": RunsCode(str(marker))}, save / "global_step2" / name)
        refused = train_tiny(tiny_data, save)
        assert refused.returncode != 0
        assert f"{save / 'global_step2' / name}: refused to load: it holds" in refused.stdout, refused.stdout[-3000:]
        assert not marker.exists()

    # An empty `latest`: named, non-zero exit, nothing trained.
    shutil.rmtree(save)
    shutil.copytree(backup, save)
    (save / "latest").write_text("")
    bad_latest = train_tiny(tiny_data, save)
    assert bad_latest.returncode != 0 and f"{save / 'latest'}: empty" in bad_latest.stdout
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step2"]


def test_a_failed_save_names_the_file_it_was_writing_and_why(tmp_path, monkeypatch):
    import collections

    from megatron_lime.training import checkpointing

    tag_dir = tmp_path / "global_step3"
    tag_dir.mkdir()
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    os.utime(tag_dir / "mp_rank_00_model_states.pt", (1, 1))
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)  # rank 0's newest: being written
    os.utime(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", (2, 2))
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)  # rank 1's, newer: not rank 0's
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 3 << 20))
    error = checkpointing.write_failure(str(tag_dir), torch_error, rank=0)
    assert str(error).startswith(f"{tag_dir / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}: cannot write the "
                                 "checkpoint: No space left on device (3 MiB free);")
    assert "(no lime_config.json), so resuming skips it" in str(error)
    os_error = OSError(28, "No space left on device", str(tag_dir / "rng_state_rank0.pt"))
    assert str(checkpointing.write_failure(str(tag_dir), os_error, rank=0)).startswith(
        f"{tag_dir / 'rng_state_rank0.pt'}: cannot write the checkpoint: No space left on device;")
    assert checkpointing.write_failure(str(tag_dir), RuntimeError("Connection closed by peer"), rank=0) is None
    assert str(checkpointing.write_failure(str(tag_dir), torch_error, rank=1)).startswith(
        f"{tag_dir / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: cannot write the checkpoint:")


class PickledByName:
    """Pickles as getattr(owner, name): how Python 3.11.2 pickles an enum member (ZeroStageEnum in ZeRO shards)."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_zero_shards_pickled_by_enum_name_load_and_getattr_stays_closed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    shard = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"zero_stage": PickledByName(ZeroStageEnum, "optimizer_states"), "w": torch.ones(2)}, shard)
    assert torch_load(shard)["zero_stage"] is ZeroStageEnum.optimizer_states
    evil = tmp_path / "evil.pt"
    torch.save({"x": PickledByName(LossScaler, "__init__")}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused to load: it holds builtins.getattr"):
        torch_load(evil)
