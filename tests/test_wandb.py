"""Weights & Biases logging: --wandb-project logs the same scalars as TensorBoard; read back from an offline run."""

import glob
import importlib.util
import json
import struct
import time
import zlib

import pytest

from megatron_lime.training.metrics import MetricsLogger, StepMetrics

# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records in
# 32 KiB blocks (crc32 4 bytes, length 2, type 1: full/first/middle/last), each a wandb Record protobuf.
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # a block's tail too short for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if length == 0 and kind == 0:
            break
        payload = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == checksum, f"bad checksum at {offset}"
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def step_metrics(iteration: int, loss: float) -> StepMetrics:
    return StepMetrics(iteration=iteration, train_iters=20, consumed_samples=8 * iteration,
                       consumed_tokens=256 * iteration, loss=loss, lr=1e-3, grad_norm=0.5, ms_per_step=100.0,
                       tokens_per_second=2560.0, world_size=1, flops_per_token=1e6, peak_tflops=None,
                       memory_gib=None, memory_kind="owned", skipped_in_window=0, skipped_total=0)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is in the test extra")
def test_offline_run_holds_the_logged_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(0, None, "lime-test", "tiny-run", {"model": {"name": "lime-tiny"}, "lr": 1e-3})
    logger.log(step_metrics(10, 5.5))
    logger.log(step_metrics(20, 4.25))
    logger.scalars({"valid/lm_loss": 4.5}, 20, 5120)
    logger.close()

    # wandb-core writes the .wandb file from its own process, and on a loaded machine finish() has returned
    # before the records reached it (seen once in a full suite run: a header and no records): wait for them.
    deadline = time.monotonic() + 30
    while True:
        try:
            [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
            records = read_wandb_records(run_file)  # a record still being written fails its checksum
        except (AssertionError, ValueError):
            if time.monotonic() > deadline:
                raise
            records = []
        kinds = [r.WhichOneof("record_type") for r in records]
        if ("run" in kinds and "exit" in kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "run" in kinds and "exit" in kinds, kinds
    run = records[kinds.index("run")].run
    assert (run.project, run.display_name) == ("lime-test", "tiny-run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"] == {"name": "lime-tiny"} and config["lr"] == 1e-3
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    assert history[10]["train/lm_loss"] == 5.5 and history[20]["train/lm_loss"] == 4.25
    assert history[20]["valid/lm_loss"] == 4.5 and history[20]["consumed_tokens"] == 5120
    assert history[10]["train/tokens_per_second"] == 2560.0 and history[10]["train/grad_norm"] == 0.5


def test_asking_for_wandb_without_it_installed_says_so(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    for rank in (0, 1):  # every rank stops, so none waits for the others
        with pytest.raises(ValueError, match="--wandb-project lime-test: wandb is not installed; pip install wandb"):
            MetricsLogger(rank, None, "lime-test", None, {})
