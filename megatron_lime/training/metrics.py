"""Training metrics: the Megatron-style log line, TensorBoard, optional W&B, and MFU.

MFU = achieved FLOP/s per device / peak dense bf16 FLOP/s of that device, with the model's
FLOPs per token from LimeConfig.flops_per_token (6N + 12 L d s). The peak comes from
--peak-tflops or from the table below by the GPU's name; on a CPU there is no honest peak
to divide by, so the line says "MFU n/a on CPU".
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass

import torch

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


def cpu_peak_rss_gib() -> float:
    import resource

    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


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
        mfu = "MFU n/a on CPU" if self.peak_tflops is None and self.memory_kind == "rss" else (
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


def format_duration(seconds: float) -> str:
    """1:02:03 for an hour and more, 2:03 below: the shortest unambiguous form for a log line."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricsLogger:
    """Rank 0 prints and writes TensorBoard / W&B; other ranks stay quiet."""

    def __init__(self, rank: int, tensorboard_dir: str | None, wandb_project: str | None,
                 wandb_name: str | None, run_config: dict):
        self.rank = rank
        self.writer = None
        self.wandb = None
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
