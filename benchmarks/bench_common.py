"""What the benchmarks share: their clocks and memory figures (every benchmark), and the training benchmarks' batches,
step timer, rows, the GPU's rates and a profile.

    from bench_common import Stopwatch, ms_per_call, peak_memory_gib, pretraining_batch, seconds_per_step

Imported by every benchmark as a module beside it (a script's own folder is on Python's path). Tests do not
import it: they run it in a subprocess with benchmarks/ on PYTHONPATH, as they run the benchmarks.

Timing, one way for all: Stopwatch times a block on a host clock with the device drained at both ends (what a step,
a save or a whole tool run costs); ms_per_call (the library's own, from megatron_lime.kernels, which its kernel plan
times with) what back-to-back calls cost the device (CUDA events on a GPU, where a host clock would add the launch
latency; the wall clock on a CPU). Peak GPU memory is the training log
line's own figure (megatron_lime.training.metrics.peak_memory_gib), reset per row here.

Batches are random tokens on the whole sequence ("pretrain") or packed SFT rows as megatron_lime.data.sft packs
them ("sft-packed": documents of 16 to 256 tokens, the last one cut to fit, positions restarting per document,
document ids, the prompt third of each document out of the loss, a tail shorter than the shortest document padded
as one more document that carries no loss).

A row of a throughput table is one batch kind, one micro-batch size, one number of micro-batches per optimizer
step (gradient accumulation), one mode (eager or torch.compile) and, for ours, one precision: "pretrain mb16x4
compile bf16" is 64 sequences per optimizer step in 4 micro-batches of 16, the recipe's per-GPU batch on 8 GPUs
(global batch 512), compiled, in DeepSpeed's bf16 mode. The peer's rows have no precision in their name (it has
one mode: fp32 weights + torch.autocast bf16).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

from megatron_lime.kernels import ms_per_call
from megatron_lime.training.metrics import peak_memory_gib

BATCH_KINDS = ("pretrain", "sft-packed")
MODES = ("eager", "compile")
# Ours: DeepSpeed's bf16 mode (bf16 weights, fp32 master copy) and DeepSpeed's torch_autocast (fp32 weights, bf16
# compute: the model card's mixed fp32/bf16); fp32 for completeness (training.config's --precision).
PRECISIONS = ("bf16", "autocast", "fp32")
# 64 sequences per step (the recipe's global batch of 512 over 8 GPUs) as the recipe runs it, 4 x 16, and as 2 x 32.
# 1 x 64 is left out: the peer's 64-sequence micro-batch is expected not to fit on an 80 GB GPU (its 32-sequence one
# took 52.3 GiB on the H200).
DEFAULT_SHAPES = ("16x4", "32x2")
# Host-device synchronisations, as the CUDA runtime API calls the profiler records (a DtoH copy to pageable
# memory blocks the host too; it is counted from the GPU-side copies, "Memcpy DtoH").
HOST_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration of a throughput table."""

    kind: str  # "pretrain" or "sft-packed"
    micro_batch: int  # sequences per micro-batch
    accumulation: int  # micro-batches per optimizer step
    mode: str  # "eager" or "compile"
    precision: str | None = None  # ours: one of PRECISIONS; None for the peer (its one mode)

    @property
    def name(self) -> str:
        return f"{self.kind} mb{self.micro_batch}x{self.accumulation} {self.mode}" + (
            f" {self.precision}" if self.precision else "")

    @property
    def fields(self) -> dict:
        """What a row's JSON says of its configuration (its figures or its error come beside)."""
        return {"batch": self.kind, "micro_batch_size": self.micro_batch, "accumulation": self.accumulation,
                "mode": self.mode, "precision": self.precision}

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch * self.accumulation


def parse_shape(text: str) -> tuple[int, int]:
    """"32x2" -> (32, 2): micro-batch size x micro-batches per optimizer step; "32" alone is "32x1"."""
    micro, _, accumulation = text.partition("x")
    try:
        shape = int(micro), int(accumulation or 1)
    except ValueError:
        raise ValueError(f"a shape is MICROxSTEPS, e.g. 16x4 (16 sequences, 4 micro-batches per step), got {text!r}")
    if min(shape) <= 0:
        raise ValueError(f"both numbers of a shape must be positive, got {text!r}")
    return shape


def rows_for(kinds, shapes, modes, sft_shapes=None, precisions=(None,)) -> list[Row]:
    """Every precision x mode x kind x shape, precisions then modes outermost (one model per precision and mode);
    sft_shapes limits the packed SFT rows."""
    rows = []
    for precision in precisions:
        for mode in modes:
            for kind in kinds:
                for shape in (shapes if kind == "pretrain" or sft_shapes is None else sft_shapes):
                    rows.append(Row(kind, *parse_shape(shape), mode, precision))
    return rows


def pretraining_batch(vocab_size: int, micro_batch: int, seq: int, device: torch.device,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tokens over the whole sequence: input_ids, labels (the next tokens), loss_mask; each (b, s)."""
    tokens = torch.randint(0, vocab_size, (micro_batch, seq + 1), generator=generator)
    return {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(micro_batch, seq, device=device)}


def packed_batch(vocab_size: int, micro_batch: int, seq: int, device: torch.device, generator: torch.Generator,
                 shortest: int = 16, longest: int = 256, prompt_fraction: float = 1 / 3) -> dict[str, torch.Tensor]:
    """Rows of documents of `shortest` to `longest` tokens (the last cut to fit), as the SFT dataset packs them.

    The first `prompt_fraction` of each document carries no loss (labels -100, loss_mask 0); a tail shorter than
    `shortest` is padding: one more document without loss. Returns input_ids, labels, loss_mask, position_ids
    (restarting at each document) and document_ids, each (b, s).
    """
    if not 0 < shortest <= longest:
        raise ValueError(f"need 0 < shortest ({shortest}) <= longest ({longest})")
    input_ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    labels = torch.full((micro_batch, seq), -100, dtype=torch.long)
    loss_mask = torch.zeros(micro_batch, seq)
    position_ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    document_ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    for row in range(micro_batch):
        cursor, document = 0, 0
        while seq - cursor >= shortest:  # best-fit packing leaves less than the shortest document
            n = min(int(torch.randint(shortest, longest + 1, (1,), generator=generator)), seq - cursor)
            tokens = torch.randint(0, vocab_size, (n + 1,), generator=generator)
            span = slice(cursor, cursor + n)
            prompt = int(n * prompt_fraction)  # targets inside the prompt are not trained
            input_ids[row, span] = tokens[:-1]
            labels[row, cursor + prompt:cursor + n] = tokens[1 + prompt:]
            loss_mask[row, cursor + prompt:cursor + n] = 1.0
            position_ids[row, span] = torch.arange(n)
            document_ids[row, span] = document
            cursor, document = cursor + n, document + 1
        position_ids[row, cursor:] = torch.arange(seq - cursor)  # the padding: one more document
        document_ids[row, cursor:] = document
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
             "document_ids": document_ids}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def make_batch(kind: str, vocab_size: int, micro_batch: int, seq: int, device: torch.device,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of `kind` ("pretrain" or "sft-packed"); packed documents are at most half the sequence long."""
    if kind == "pretrain":
        return pretraining_batch(vocab_size, micro_batch, seq, device, generator)
    if kind == "sft-packed":
        return packed_batch(vocab_size, micro_batch, seq, device, generator, shortest=min(16, seq // 4),
                            longest=min(256, seq // 2))
    raise ValueError(f"batch kind must be one of {BATCH_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Clocks and memory: every benchmark's, written once


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on `device`: a GPU runs behind the host; a CPU (or no device) has nothing queued."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Stopwatch:
    """Seconds of a `with` block on a host clock, `device`'s queued work drained on the way in and out (else a GPU's
    work would spill past the block's end); while the block runs, `seconds` is the time so far.

        with Stopwatch(device) as watch:
            step()
        watch.seconds

    clock "wall" is the wall clock; "cpu" this process's CPU time (a CPU device only: robust to other processes
    loading a shared machine). A block that raises is not drained: the error goes up as it was, not one from the
    device.
    """

    def __init__(self, device: torch.device | None = None, clock: str = "wall"):
        if clock == "cpu" and device is not None and device.type != "cpu":
            raise ValueError("the cpu clock measures this process's CPU time: only for the CPU device")
        self.device = device
        self.now = CLOCKS[clock]
        self.started = self.stopped = None

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self.started, self.stopped = self.now(), None
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            synchronize(self.device)
        self.stopped = self.now()

    @property
    def seconds(self) -> float:
        return (self.now() if self.stopped is None else self.stopped) - self.started


def reset_peak_memory(device: torch.device) -> None:
    """Start peak_memory_gib's high-water mark afresh (a GPU; nothing on a CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def seconds_per_step(step: Callable[[], object], steps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of step() over `steps` back-to-back calls, the device drained before and after (Stopwatch's
    clocks)."""
    with Stopwatch(device, clock) as watch:
        for _ in range(steps):
            step()
    return watch.seconds / steps


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or an error that wraps one (torch.compile's backend errors carry it as text)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def wait_while(path: str | None, limit_s: float = 600.0, poll_s: float = 0.5) -> float:
    """Wait while the file `path` exists (gpu_check.sh's marker of a build running beside this benchmark), at most
    limit_s seconds; returns the seconds waited. None or a missing file: no wait."""
    with Stopwatch() as waited:
        if path and os.path.exists(path):
            print(f"waiting for {path} to go (the build is running) before timing", flush=True)
            while os.path.exists(path) and waited.seconds < limit_s:
                time.sleep(poll_s)
    return waited.seconds


def timed_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device,
                quiet_marker: str | None = None) -> dict:
    """`warmup` calls of step() (compilation included), then, once the file `quiet_marker` (if any) is gone,
    `steps` timed ones, peak memory counted from the first: {"seconds": per timed step, "wall_seconds_with_warmup":
    ..., "waited_s": ...}, or {"error": "out of memory: ...", "oom": True} when the row did not fit on the GPU
    (returned, not raised, so the error's frames no longer hold the row's tensors when the caller frees them and
    goes on to the next row)."""
    reset_peak_memory(device)
    try:
        with Stopwatch() as wall:
            for _ in range(warmup):
                step()
            synchronize(device)
            waited = wait_while(quiet_marker)
            seconds = seconds_per_step(step, steps, device)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return {"error": f"out of memory: {str(error).strip().splitlines()[0][:300]}", "oom": True}
    return {"seconds": seconds, "wall_seconds_with_warmup": wall.seconds - waited, "waited_s": waited}


def matmul_tflops(size: int, device: torch.device, repeats: int = 20) -> float:
    """bf16 size^3 matmul rate on random data on a GPU (median of `repeats` single calls, device time)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = [ms_per_call(lambda: a @ b, device, 1) / 1e3 for _ in range(repeats)]
    return 2 * size**3 / statistics.median(seconds) / 1e12


def throughput(row: Row, seq: int, seconds: float, flops_per_token: float, peak_tflops: float | None,
               device: torch.device) -> dict:
    """The figures of one timed row: tokens/s over every position, TFLOP/s, MFU of the datasheet peak, memory."""
    tokens_per_second = row.sequences_per_step * seq / seconds
    tflops = tokens_per_second * flops_per_token / 1e12
    return {**row.fields, "seq_length": seq, "ms_per_step": 1e3 * seconds,
            "tokens_per_second": tokens_per_second, "tflops": tflops,
            "mfu_datasheet": tflops / peak_tflops if peak_tflops else None,
            "peak_memory_gib": peak_memory_gib(device)}


def format_row(name: str, figures: dict) -> str:
    """One line of a throughput table."""
    if "error" in figures:
        return f"  {name:<34} {'OOM: ' if figures.get('oom') else ''}{figures['error']}"
    mfu = f"{100 * figures['mfu_datasheet']:5.1f}%" if figures.get("mfu_datasheet") else "  n/a"
    memory = f"{figures['peak_memory_gib']:5.1f} GiB" if figures.get("peak_memory_gib") is not None else "  n/a"
    losses = (f"  loss {figures['first_loss']:.2f} -> {figures['last_loss']:.2f}"
              if figures.get("first_loss") is not None else "")
    return (f"  {name:<34} {figures['ms_per_step']:8.1f} ms/step {figures['tokens_per_second']:9.0f} tokens/s "
            f"{figures['tflops']:7.1f} TFLOP/s  MFU {mfu}  peak mem {memory}{losses}")


# ----------------------------------------------------------------------------------------------
# One profiled configuration


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        busy += end - max(start, reach)
        reach = end
    return busy


def profile_steps(step: Callable[[], object], steps: int, device: torch.device, top: int = 20) -> dict:
    """torch.profiler over `steps` calls of step(): the top kernels by device time, the device's idle share, host syncs.

    On a GPU the kernels are CUDA kernels (and copies), idle is 1 - (union of kernel intervals) / (wall time of the
    steps), and host syncs count cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls and
    device-to-host copies. On a CPU (the dry run) the same table lists CPU operators by self time; idle and syncs
    have no meaning there and are None.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        with Stopwatch(device) as watch:
            for _ in range(steps):
                step()
    wall = watch.seconds
    events = prof.events()
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    totals: dict[str, list[float]] = {}
    intervals = []
    for event in events:
        if event.device_type != device_type:
            continue
        seconds = (event.time_range.elapsed_us() if cuda else event.self_cpu_time_total) / 1e6
        if cuda:
            intervals.append((event.time_range.start / 1e6, event.time_range.end / 1e6))
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    accounted = sum(seconds for seconds, _ in totals.values())
    kernels = [{"name": name, "seconds_per_step": seconds / steps, "calls_per_step": calls / steps,
                "share": seconds / accounted if accounted else 0.0} for name, (seconds, calls) in ranked]
    result = {"steps": steps, "wall_seconds_per_step": wall / steps, "device": "cuda" if cuda else "cpu",
              "kernels": kernels, "device_idle_share": None, "host_syncs_per_step": None}
    if cuda:
        result["device_idle_share"] = max(0.0, 1.0 - _busy_seconds(intervals) / wall)
        syncs = {name: 0 for name in HOST_SYNC_CALLS}
        syncs["Memcpy DtoH"] = 0
        for event in events:
            if event.name in HOST_SYNC_CALLS:
                syncs[event.name] += 1
            elif event.name.startswith("Memcpy DtoH") and event.device_type == device_type:
                syncs["Memcpy DtoH"] += 1
        result["host_syncs_per_step"] = {name: count / steps for name, count in syncs.items()}
    return result


def profile_table(title: str, profile: dict) -> str:
    """The profile as markdown: a summary line, then the top kernels."""
    lines = [f"### {title}", ""]
    summary = f"{profile['steps']} profiled steps, {1e3 * profile['wall_seconds_per_step']:.1f} ms per step (wall)"
    if profile["device_idle_share"] is not None:
        summary += f"; GPU idle {100 * profile['device_idle_share']:.1f}% of the step"
    if profile["host_syncs_per_step"] is not None:
        summary += "; host syncs per step: " + ", ".join(
            f"{name} {count:g}" for name, count in profile["host_syncs_per_step"].items())
    lines += [summary, "", f"| {'kernel' if profile['device'] == 'cuda' else 'operator (CPU, self time)'} "
              "| ms per step | calls per step | share |", "|---|---|---|---|"]
    for kernel in profile["kernels"]:
        name = kernel["name"].replace("|", "/")
        name = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| `{name}` | {1e3 * kernel['seconds_per_step']:.3f} | {kernel['calls_per_step']:g} | "
                     f"{100 * kernel['share']:.1f}% |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# One process per configuration


def run_apart(script: str, argv: list[str], groups: list[tuple[str, list[str]]], json_path: str | None,
              markdown_path: str | None = None) -> int:
    """Run `script argv EXTRA --json CHILD` in a fresh process per (label, EXTRA) of `groups` and merge what they
    wrote.

    Why: a model, its optimizer state and DeepSpeed's engine are not all freed when one configuration ends (the
    first GPU call's compile rows carried 12.8 GiB of the eager engine's weights and AdamW state), so each
    configuration's peak memory is measured in a process of its own (bench_gpu_train.py: one per precision and
    mode). The children write JSON (and markdown) beside `json_path` (`markdown_path`); this merges their "runs" and
    "profiles" into `json_path` after each child, so a check cut short keeps the finished children's rows; a child
    that dies (killed, out of host memory) leaves an error row "<label> (all)". Returns 1 if any child failed.
    """
    import json
    import subprocess
    import sys
    import tempfile

    from megatron_lime.files import write_json, write_text

    merged: dict = {}
    texts: list[str] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="lime-bench-") as folder:
        for index, (label, extra) in enumerate(groups):
            child_json = os.path.join(folder, f"{index}.json")
            child_md = os.path.join(folder, f"{index}.md")
            command = [sys.executable, script, *argv, *extra, "--json", child_json]
            if markdown_path:
                command += ["--profile-md", child_md]
            with Stopwatch() as child_wall:
                returncode = subprocess.run(command).returncode
            print(f"[{label}: exit {returncode} after {child_wall.seconds:.0f} s]", flush=True)
            failed |= returncode != 0
            child: dict = {}
            if os.path.exists(child_json):
                with open(child_json, encoding="utf-8") as handle:
                    child = json.load(handle)
            if returncode != 0 and not child.get("runs"):
                child.setdefault("runs", {})[f"{label} (all)"] = {"error": f"the process exited with {returncode}"}
            for key, value in child.items():
                if isinstance(value, dict) and key in ("runs", "profiles", "processes"):
                    merged.setdefault(key, {}).update(value)
                else:
                    merged.setdefault(key, value)
            merged.setdefault("children", {})[label] = {"exit": returncode,
                                                       "wall_seconds": child_wall.seconds}
            if json_path and merged:
                write_json(json_path, merged)
            if markdown_path and os.path.exists(child_md):
                texts.append(open(child_md, encoding="utf-8").read())
                write_text(markdown_path, "\n".join(texts))
    return 1 if failed else 0
