"""Training metrics: the Megatron-style log line, TensorBoard, optional W&B, MFU, goodput, and the records of
metrics.jsonl (its format and reader: megatron_lime/metrics_file.py).

MFU = achieved FLOP/s per device / peak dense bf16 FLOP/s of that device, with the model's
FLOPs per token from LimeConfig.flops_per_token (6N + 12 L d s). The peak comes from
--peak-tflops or from the table below by the GPU's name; on a CPU there is no honest peak
to divide by, so the line says "MFU n/a on CPU".
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megatron_lime.files import write_text
from megatron_lime.metrics_file import GOODPUT_PHASES, METRICS_FILE, PHASE_NAMES, read_metrics

# Peak dense bf16 tensor-core TFLOP/s (no sparsity), from the vendors' data sheets.
# Matched by substring of torch.cuda.get_device_name(), first match wins (so H100 NVL / PCIe
# come before the SXM default).
GPU_PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("A6000", 155.0),
    ("V100", 125.0),  # fp16 tensor cores; V100 has no bf16
]


def peak_tflops_for(device: torch.device, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device, or None when unknown (CPU, or a GPU not in the table)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def owned_memory_bytes(pid: int | str = "self") -> int:
    """Memory a process owns: RssAnon + RssShmem of /proc/PID/status (its heap, tensors, shared memory), not the
    file pages it merely maps (RssFile: a memory-mapped dataset, the shared libraries), which the kernel drops
    and rereads at will and which a 40 GB .bin would otherwise make look like 19 GiB of "memory"."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssShmem"):
                fields[name] = int(value.split()[0]) * 1024  # kB
    return sum(fields.values())


class OwnedMemoryPeak:
    """The most memory this process has owned (owned_memory_bytes), sampled every `interval_s` by a daemon thread
    from `start()` on, and at every `gib()` call: a rise and fall shorter than the interval can be missed (the
    index build of a 20B-token corpus lasts seconds). Reading /proc/self/status takes about 20 us."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak = 0
        self.thread: threading.Thread | None = None

    def sample(self) -> None:
        self.peak = max(self.peak, owned_memory_bytes())

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="owned-memory-peak", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(self.interval_s)

    def gib(self) -> float:
        self.sample()
        return self.peak / 2**30


OWNED_MEMORY_PEAK = OwnedMemoryPeak()  # the process's one sampler; MetricsLogger starts it


def cpu_owned_memory_gib() -> float:
    """The most memory this process has owned since its MetricsLogger started (OwnedMemoryPeak), in GiB."""
    return OWNED_MEMORY_PEAK.gib()


@dataclass
class StepMetrics:
    """What one logging window reports (averages over the window's steps)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    consumed_tokens: int
    loss: float
    lr: float
    grad_norm: float | None
    ms_per_step: float
    tokens_per_second: float
    world_size: int
    flops_per_token: float
    peak_tflops: float | None
    memory_gib: float | None
    memory_kind: str
    skipped_in_window: int
    skipped_total: int

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.tokens_per_second / self.world_size

    @property
    def tflops_per_device(self) -> float:
        return self.tokens_per_second_per_device * self.flops_per_token / 1e12

    @property
    def seconds_left(self) -> float:
        """Time to the last iteration at this window's pace (evaluation and saves not counted)."""
        return max(self.train_iters - self.iteration, 0) * self.ms_per_step / 1000

    @property
    def mfu(self) -> float | None:
        return None if self.peak_tflops is None else self.tflops_per_device / self.peak_tflops

    def line(self) -> str:
        grad = "n/a" if self.grad_norm is None else f"{self.grad_norm:.3f}"
        mfu = "MFU n/a on CPU" if self.peak_tflops is None and self.memory_kind == "owned" else (
            "MFU n/a (unknown GPU: pass --peak-tflops)" if self.mfu is None else f"MFU {100 * self.mfu:.1f}%")
        memory = "n/a" if self.memory_gib is None else f"{self.memory_gib:.2f} GiB ({self.memory_kind})"
        return (f" iteration {self.iteration:8d}/{self.train_iters:8d} |"
                f" consumed samples {self.consumed_samples:12d} | consumed tokens {self.consumed_tokens:14d} |"
                f" lm loss {self.loss:.6E} | lr {self.lr:.4E} | grad norm {grad} |"
                f" ms/step {self.ms_per_step:.1f} | tokens/s {self.tokens_per_second:.0f}"
                f" ({self.tokens_per_second_per_device:.0f}/device) |"
                f" TFLOP/s/device {self.tflops_per_device:.2f} | {mfu} | peak memory {memory} |"
                f" skipped {self.skipped_in_window} (total {self.skipped_total}) |"
                f" time left {format_duration(self.seconds_left)}")


@dataclass
class StepWindow:
    """The steps since the last log line. Losses and gradient norms stay on the device, summed there, and are read
    once, when the window closes into the log line's StepMetrics: a step never waits for the GPU on the log's
    account. The run's constants are given once."""

    train_iters: int
    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak_tflops: float | None
    device: torch.device

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_steps = 0
        self.grad_norm_value: torch.Tensor | float | None = None
        self.skipped = 0

    def add(self, result: Any, seconds: float) -> None:
        """One step: `result` is training/pretrain.py's StepResult (mean_loss, grad_norm_value, skipped)."""
        self.steps += 1
        self.seconds += seconds
        if result.skipped:
            self.skipped += 1
        else:
            self.loss_sum = self.loss_sum + result.mean_loss
            self.loss_steps += 1
            self.grad_norm_value = result.grad_norm_value

    @property
    def loss(self) -> float:
        return float(self.loss_sum) / self.loss_steps if self.loss_steps else float("nan")

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_value is None else float(self.grad_norm_value)

    def close(self, state: Any, lr: float) -> StepMetrics:
        """The window's figures at `state` (the loop's TrainState: iteration, consumed samples and tokens, skipped
        steps), read from the device once; the window starts again empty."""
        seconds_per_step = self.seconds / max(self.steps, 1)
        memory = peak_memory_gib(self.device)
        metrics = StepMetrics(
            iteration=state.iteration, train_iters=self.train_iters, consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens, loss=self.loss, lr=lr, grad_norm=self.grad_norm,
            ms_per_step=1000.0 * seconds_per_step, tokens_per_second=self.tokens_per_step / seconds_per_step,
            world_size=self.world_size, flops_per_token=self.flops_per_token, peak_tflops=self.peak_tflops,
            memory_gib=memory if memory is not None else cpu_owned_memory_gib(),
            memory_kind="allocated" if memory is not None else "owned",
            skipped_in_window=self.skipped, skipped_total=state.skipped_steps)
        self.reset()
        return metrics


def format_duration(seconds: float) -> str:
    """1:02:03 for an hour and more, 2:03 below: the shortest unambiguous form for a log line."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------------------------------------
# Goodput: where the wall time of a run went

def process_start_time() -> float:
    """time.time() when this process started (Linux: /proc/self/stat, to 10 ms): start-up includes the imports."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks after boot
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


class Goodput:
    """The wall time of one process (one start of a run), split into phases; the share in steps is the goodput.

    startup     process start to the first batch asked for (imports, index builds, wrapping, loading a
                checkpoint), less evaluation and checkpoint time in it
    steps       the optimizer steps: from one step's end to the next, less what the phases below took
    data        waiting for the next batch (time in the batch iterator's next())
    evaluation  validation and in-training task scores
    checkpoint  saves, as long as they block training
    redone      steps of a resumed run that the run before had already taken past its last checkpoint
                (the furthest iteration in metrics.jsonl: known to the --log-interval)
    other       the rest (the last save's wait for the other ranks, closing)

    The loop calls `batches` once (wrapping its batch iterator) and `step_done` after every step; the
    checkpointer and the evaluators time themselves with `phase`.
    """

    def __init__(self):
        self.started = process_start_time()
        self.seconds = dict.fromkeys(GOODPUT_PHASES, 0.0)
        self.redo_until = 0  # steps up to this iteration are redone work
        self.first_iteration: int | None = None
        self.iteration = 0
        self.steps = 0
        self.redone_steps = 0
        self._loop_started: float | None = None  # time.time() of the first batch asked for
        self._last_mark = 0.0  # perf_counter at the last step's end (or the loop's start)
        self._in_phases = 0.0  # phase seconds since then

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.seconds[name] += seconds
            self._in_phases += seconds

    def batches(self, iterator: Iterator) -> Iterator:
        """`iterator` with the time in next() counted as data wait; the first call ends start-up."""
        while True:
            if self._loop_started is None:
                self._start_loop()
            with self.phase("data"):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch

    def _start_loop(self) -> None:
        self._loop_started = time.time()
        before = self.seconds["evaluation"] + self.seconds["checkpoint"]
        self.seconds["startup"] = self._loop_started - self.started - before
        self._last_mark, self._in_phases = time.perf_counter(), 0.0

    def step_done(self, iteration: int) -> None:
        """Step `iteration` has ended: the time since the last step's end, less the phases in it, was this step."""
        now = time.perf_counter()
        seconds = max(0.0, now - self._last_mark - self._in_phases)
        if self.first_iteration is None:
            self.first_iteration = iteration - 1
        if iteration <= self.redo_until:
            self.seconds["redone"] += seconds
            self.redone_steps += 1
        else:
            self.seconds["steps"] += seconds
            self.steps += 1
        self.iteration = iteration
        self._last_mark, self._in_phases = now, 0.0

    def finish(self) -> dict[str, Any]:
        """The accounting up to now, as metrics.jsonl's "goodput" record."""
        wall = time.time() - self.started
        seconds = dict(self.seconds)
        if self._loop_started is None:  # no step was taken: all of it was start-up
            seconds["startup"] = wall - seconds["evaluation"] - seconds["checkpoint"]
        seconds["other"] = max(0.0, wall - sum(v for k, v in seconds.items() if k != "other"))
        return {"kind": "goodput", "iteration": self.iteration,
                "first_iteration": self.first_iteration if self.first_iteration is not None else self.iteration,
                "steps": self.steps, "redone_steps": self.redone_steps, "wall_s": wall,
                "goodput": seconds["steps"] / wall if wall > 0 else None, "seconds": seconds}


def goodput_line(record: dict[str, Any]) -> str:
    """The one-line summary a run prints at its end."""
    wall, seconds = record["wall_s"], record["seconds"]
    parts = [f"{PHASE_NAMES[name]} {format_duration(seconds[name])} ({100 * seconds[name] / wall:.1f}%)"
             + (f" [{record['redone_steps']} steps]" if name == "redone" else "")
             for name in GOODPUT_PHASES if name in ("steps", "startup") or seconds[name] >= 0.05
             or (name == "redone" and record["redone_steps"])]  # redone work is named, however short
    return (f" goodput {100 * (record['goodput'] or 0):.1f}% of {format_duration(wall)} wall, iterations "
            f"{record['first_iteration']} -> {record['iteration']} | " + " | ".join(parts))


class MetricsLogger:
    """Rank 0 prints and writes TensorBoard / W&B; other ranks stay quiet. `goodput` accounts for the wall time."""

    def __init__(self, rank: int, tensorboard_dir: str | None, wandb_project: str | None,
                 wandb_name: str | None, run_config: dict):
        self.rank = rank
        self.writer = None
        self.wandb = None
        self.goodput = Goodput()
        OWNED_MEMORY_PEAK.start()  # the CPU's peak memory figure (on GPUs torch's own is reported)
        save_dir = run_config.get("checkpoint", {}).get("save")
        self.metrics_path = os.path.join(save_dir, METRICS_FILE) if save_dir else None
        if wandb_project and importlib.util.find_spec("wandb") is None:  # every rank stops, not only rank 0
            raise ValueError(f"--wandb-project {wandb_project}: wandb is not installed; pip install wandb "
                             "(or drop --wandb-project; TensorBoard needs nothing extra)")
        if rank != 0:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            import wandb  # WANDB_MODE=offline / WANDB_DIR and the rest of wandb's environment apply

            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_name, config=run_config)

    def print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def show_library_log(self, name: str) -> None:
        """Rank 0 prints the INFO lines of the logger `name` (and its children) as "> " lines of the log;
        the other ranks keep their warnings only."""
        library = logging.getLogger(name)
        if self.rank == 0 and not any(getattr(h, "lime_log", False) for h in library.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("> %(message)s"))
            handler.lime_log = True
            library.addHandler(handler)
            library.setLevel(logging.INFO)

    def log(self, metrics: StepMetrics) -> None:
        if self.rank != 0:
            return
        print(metrics.line(), flush=True)
        scalars = {
            "train/lm_loss": metrics.loss,
            "train/lr": metrics.lr,
            "train/ms_per_step": metrics.ms_per_step,
            "train/tokens_per_second": metrics.tokens_per_second,
            "train/tokens_per_second_per_device": metrics.tokens_per_second_per_device,
            "train/tflops_per_device": metrics.tflops_per_device,
            "train/skipped_steps": metrics.skipped_total,
        }
        if metrics.grad_norm is not None and math.isfinite(metrics.grad_norm):
            scalars["train/grad_norm"] = metrics.grad_norm
        if metrics.mfu is not None:
            scalars["train/mfu"] = metrics.mfu
        if metrics.memory_gib is not None:
            scalars["train/peak_memory_gib"] = metrics.memory_gib
        self.scalars(scalars, metrics.iteration, metrics.consumed_tokens)
        self.record({"kind": "train", "iteration": metrics.iteration, "consumed_tokens": metrics.consumed_tokens,
                     "loss": metrics.loss, "lr": metrics.lr, "grad_norm": metrics.grad_norm,
                     "ms_per_step": metrics.ms_per_step, "tokens_per_second": metrics.tokens_per_second,
                     "tflops_per_device": metrics.tflops_per_device, "mfu": metrics.mfu,
                     "memory_gib": metrics.memory_gib, "memory_kind": metrics.memory_kind,
                     "skipped": metrics.skipped_in_window, "skipped_total": metrics.skipped_total})

    def start_at(self, iteration: int) -> None:
        """Drop metrics.jsonl lines after `iteration` (a resumed run writes them again; "goodput" lines stay);
        the steps up to the furthest iteration recorded will be redone (Goodput)."""
        if self.rank != 0 or self.metrics_path is None or not os.path.isfile(self.metrics_path):
            return
        records = read_metrics(self.metrics_path)
        self.goodput.redo_until = max([iteration] + [r["iteration"] for r in records])
        kept = [r for r in records if r["iteration"] <= iteration or r["kind"] == "goodput"]
        if len(kept) != len(records):
            write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def record(self, values: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (rank 0; flushed, so a crash loses at most the line being written)."""
        if self.rank != 0 or self.metrics_path is None:
            return
        os.makedirs(os.path.dirname(self.metrics_path), exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    def scalars(self, values: dict[str, float], iteration: int, consumed_tokens: int) -> None:
        if self.rank != 0:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, iteration)
            if "train/lm_loss" in values:
                self.writer.add_scalar("train/lm_loss_vs_tokens", values["train/lm_loss"], consumed_tokens)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({**values, "consumed_tokens": consumed_tokens}, step=iteration)
        if "valid/lm_loss" in values:  # the validation's one call: its metrics.jsonl line
            self.record({"kind": "valid", "iteration": iteration, "consumed_tokens": consumed_tokens,
                         "loss": values["valid/lm_loss"], "ppl": values.get("valid/ppl")})

    def task_scores(self, report: dict[str, Any], iteration: int, consumed_tokens: int) -> None:
        """lm-eval task results (megatron_lime.evaluation's summary) to the log, TensorBoard/W&B and metrics.jsonl."""
        if self.rank != 0:
            return
        tasks = report["tasks"]
        scores = {name: task["score"] for name, task in tasks.items()}
        print(f" task scores at iteration {iteration} | " + " | ".join(
            f"{name} {tasks[name]['score_metric']} {score:.4f} (n={tasks[name]['n_samples']})"
            for name, score in scores.items() if score is not None), flush=True)
        self.scalars({f"tasks/{name}": score for name, score in scores.items() if score is not None},
                     iteration, consumed_tokens)
        self.record({"kind": "tasks", "iteration": iteration, "consumed_tokens": consumed_tokens, "scores": scores,
                     "metrics": {name: task["metrics"] for name, task in tasks.items()},
                     "n_samples": {name: task["n_samples"] for name, task in tasks.items()}})

    def close(self) -> None:
        """The end of a run (also after SIGTERM): the goodput summary line and record, then the writers."""
        record = self.goodput.finish()
        self.print(goodput_line(record))
        self.record(record)
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
