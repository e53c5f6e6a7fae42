"""Checkpoint integrity (issue 21): every file a save writes has its content hash in the completion record;
resume, conversion, evaluation and an export's own from_pretrained check them before use."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest

from helpers import load_tool, make_tiny_pretraining_data, train_tiny
from megatron_lime.training.launch import free_port
from megatron_lime import checkpoint
from megatron_lime.checkpoint import CheckpointError, integrity

MISMATCH = "content hash mismatch: expected "


def flip_byte(path) -> None:
    """Change one byte in the middle of a file (inside the tensor data of a .pt: torch.load does not notice)."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def digest(path, algorithm: str = integrity.HASH_ALGORITHM) -> str:
    """The file's hash computed here, independently of integrity.file_hash."""
    data = open(path, "rb").read()
    if algorithm.startswith("xxh"):
        import xxhash

        return f"{algorithm}:{getattr(xxhash, algorithm)(data).hexdigest()}"
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def sha256(path) -> str:  # exports always use SHA-256 (their own loading code has only the standard library)
    return digest(path, "sha256")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 1-rank DeepSpeed save dir with global_step2 and global_step4 (latest), and the tiny data."""
    root = tmp_path_factory.mktemp("integrity")
    data = make_tiny_pretraining_data(str(root / "data"), num_docs=60)
    result = train_tiny(data, root / "save")
    assert result.returncode == 0, result.stdout[-4000:]
    return dict(root=root, data=data, save=root / "save")


def copy_save(saved, tmp_path):
    target = tmp_path / "save"
    shutil.copytree(saved["save"], target)
    return target


FILE_KINDS = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_state_rank0.pt",
              "ds_config.json")


def test_a_save_records_the_hash_of_every_file_it_wrote(saved):
    tag_dir = saved["save"] / "global_step4"
    record = json.loads((tag_dir / "lime_config.json").read_text())["files"]
    assert sorted(record) == sorted(p.name for p in tag_dir.iterdir() if p.name != "lime_config.json")
    assert sorted(record) == sorted(FILE_KINDS)
    for name, recorded in record.items():
        assert recorded == digest(tag_dir / name), name
    assert load_tool("verify_checkpoint").main([str(saved["save"])]) == 0


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", FILE_KINDS)
def test_a_flipped_byte_in_each_file_kind_stops_resume_conversion_and_evaluation(saved, tmp_path, capsys, name):
    import torch.distributed as dist

    from megatron_lime.training.checkpointing import Checkpointer

    save = copy_save(saved, tmp_path)
    path = save / "global_step4" / name
    expected = digest(path)
    flip_byte(path)
    if name.endswith(".pt"):
        checkpoint.torch_load(path)  # the flip is silent to the loader: only the hash catches it
    line = f"{path}: {MISMATCH}{expected}, found {digest(path)}"

    # Conversion: one line naming the file, the expected and the found hash; nothing written.
    assert load_tool("convert_to_hf").main(["--load", str(save), "--output", str(tmp_path / "hf")]) == 1
    assert line in one_error_line(capsys)
    assert not (tmp_path / "hf").exists()

    # Evaluation (and generation: the same load_model).
    pytest.importorskip("lm_eval")
    from megatron_lime.evaluation.lm import LimeLM

    with pytest.raises(CheckpointError) as raised:
        LimeLM(load=str(save), device="cpu")
    assert line in str(raised.value) and "\n" not in str(raised.value)

    # Resume: checked before DeepSpeed reads anything; the message names the newest earlier good tag.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        checkpointer = Checkpointer(None, None, None, {}, {}, rank=0, world_size=1)
        with pytest.raises(CheckpointError) as raised:
            checkpointer.verify(checkpoint.resolve_load(str(save)), None)
    finally:
        dist.destroy_process_group()
    message = str(raised.value)
    assert message.startswith(line) and "\n" not in message
    assert f"the newest earlier checkpoint that verifies is {save / 'global_step2'}: resume from it with " \
           f"--load {save / 'global_step2'}" in message


def test_resume_stops_on_a_file_from_another_checkpoint_and_changes_nothing(saved, tmp_path):
    save = copy_save(saved, tmp_path)
    shard = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # (the RNG files of the two tags are identical here)
    shutil.copy(save / "global_step2" / shard, save / "global_step4" / shard)
    before = {p: p.stat().st_mtime_ns for p in save.rglob("*")}
    result = train_tiny(saved["data"], save)
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if MISMATCH in line]
    assert len(lines) == 1, result.stdout[-3000:]
    assert f"{save / 'global_step4' / shard}: content hash mismatch" in lines[0]
    assert f"resume from it with --load {save / 'global_step2'}" in lines[0]
    assert "Traceback" not in result.stdout
    assert all(p.exists() and p.stat().st_mtime_ns == t for p, t in before.items())  # nothing changed
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step2", "global_step4"]
    # The advice works: resuming from the tag it names trains on.
    resumed = train_tiny(saved["data"], save / "global_step2", "--save", str(tmp_path / "new"), "--exit-interval", "3")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "iteration 2" in resumed.stdout


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """A consolidated folder and a Hugging Face export (fp32) of the save's latest weights."""
    root = tmp_path_factory.mktemp("exported")
    weights = checkpoint.load_lime_weights(saved["save"])
    checkpoint.write_consolidated(root / "consolidated", weights.state_dict, weights.metadata)
    assert load_tool("convert_to_hf").main(["--load", str(root / "consolidated"), "--output", str(root / "hf"),
                                            "--dtype", "fp32"]) == 0
    return dict(consolidated=root / "consolidated", hf=root / "hf")


def test_consolidated_weights_are_checked_by_conversion_and_evaluation(exported, tmp_path, capsys):
    folder = tmp_path / "consolidated"
    shutil.copytree(exported["consolidated"], folder)
    meta = json.loads((folder / "lime_config.json").read_text())
    assert meta["files"] == {"model.safetensors": digest(folder / "model.safetensors")}
    expected = digest(folder / "model.safetensors")
    flip_byte(folder / "model.safetensors")
    line = f"{folder / 'model.safetensors'}: content hash mismatch: expected {expected}, found"
    with pytest.raises(CheckpointError, match="content hash mismatch") as raised:
        checkpoint.read_consolidated(folder)
    assert str(raised.value).startswith(line)
    assert load_tool("convert_to_hf").main(["--load", str(folder), "--output", str(tmp_path / "hf")]) == 1
    assert line in one_error_line(capsys)
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        checkpoint.load_model(folder)


def from_pretrained(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)


def test_an_export_is_checked_by_its_own_from_pretrained_and_by_our_readers(exported, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(exported["hf"], hf)
    record = json.loads((hf / "lime_run.json").read_text())["files"]
    assert sorted(record) == sorted(p.name for p in hf.iterdir() if p.name != "lime_run.json")
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"} <= set(record)
    from_pretrained(hf)  # intact: loads

    weights = hf / "model.safetensors"
    expected = sha256(weights)
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated
    line = f"{weights}: content hash mismatch: expected {expected}, found {sha256(weights)}"
    with pytest.raises(ValueError) as raised:
        from_pretrained(hf)
    assert str(raised.value).startswith(line) and "\n" not in str(raised.value)
    with pytest.raises(CheckpointError) as raised:
        checkpoint.load_model(hf)
    assert str(raised.value).startswith(line)
    assert load_tool("convert_to_hf").main(["--from-hf", "--load", str(hf), "--output", str(tmp_path / "back")]) == 1
    assert line in one_error_line(capsys)
    assert not (tmp_path / "back").exists()

    # A tokenizer file, and verify_checkpoint: the first bad file, or with --all every one.
    flip_byte(hf / "tokenizer.json")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        checkpoint.load_model(hf)
    verify = load_tool("verify_checkpoint")
    capsys.readouterr()
    assert verify.main([str(hf)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert verify.main([str(hf), "--all"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and any("tokenizer.json" in e for e in err) and any("model.safetensors" in e for e in err)


def test_checkpoints_without_hashes_load_with_one_warning(saved, exported, tmp_path, caplog):
    save = copy_save(saved, tmp_path)
    consolidated = tmp_path / "consolidated"
    shutil.copytree(exported["consolidated"], consolidated)
    hf = tmp_path / "hf"
    shutil.copytree(exported["hf"], hf)
    for record_file in (save / "global_step4" / "lime_config.json", consolidated / "lime_config.json",
                        hf / "lime_run.json"):
        meta = json.loads(record_file.read_text())
        del meta["files"]
        record_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="megatron_lime.checkpoint.integrity"):
        for folder in (save, consolidated, hf):
            checkpoint.load_lime_weights(folder)
            checkpoint.load_lime_weights(folder)  # a second load does not repeat the warning
    warnings = [r.getMessage() for r in caplog.records if r.name == "megatron_lime.checkpoint.integrity"]
    assert len(warnings) == 3 and all("loading it unverified" in w for w in warnings), warnings
    assert str(save / "global_step4") in warnings[0]
    assert load_tool("verify_checkpoint").main([str(consolidated)]) == 0
    from_pretrained(hf)  # the export's own code loads it too (after its own warning)


def test_a_record_made_with_xxhash_names_what_is_missing_where_xxhash_is_not(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    assert integrity.file_hash(path, "sha256") == digest(path, "sha256")
    recorded = "xxh3_128:00000000000000000000000000000000"
    monkeypatch.setattr(integrity, "xxhash", None)
    problem = integrity.check_file(tmp_path, "weights.bin", recorded)
    assert problem == f"{path}: cannot check its recorded hash {recorded}: xxh3_128 needs the xxhash package " \
                      "(pip install xxhash)"
    with pytest.raises(CheckpointError, match="needs the xxhash package"):
        integrity.verify(tmp_path, {"files": {"weights.bin": recorded}})
