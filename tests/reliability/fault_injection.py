"""Rerun issue 12's fault-injection table: every case is a real run of a real command, with its outcome.

    python tests/reliability/fault_injection.py                 all cases
    python tests/reliability/fault_injection.py -k sigterm      the cases whose name contains "sigterm"
    python tests/reliability/fault_injection.py --list          the registered cases

Prints one row per case: exit code, seconds until every process of the run had ended, the error's
message (the last `SomethingError: ...` line, or the last line printed), and the leftovers: files
the run left in its output folder and processes still alive in its process group. A case is one
function registered with @case that builds its inputs in a scratch folder and returns a `Run`;
to add one, write another such function. CPU only, lime-tiny; about 15 s per training case on 2 cores.
The tiny corpus, tokenizer and dataset are made with the package's own tools (tools/make_sample_data.py,
train_tokenizer.py, preprocess_data.py); nothing is imported from the test suite (tests/helpers.py).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from megatron_lime.training.launch import free_port, live_processes_in_group

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/reliability/ -> the repo
TIMEOUT_S = 180
ERROR_LINE = re.compile(r"^(\[rank \d+\] )?([\w.]*(Error|Exception|Fault|Interrupt|Exit)\b.*|(error|ERROR)\b.*)$")


@dataclass
class Run:
    """What a case runs: a command, its environment, and where its output goes."""

    command: list[str]
    output_dir: str  # leftovers are the files found here afterwards
    env: dict[str, str] = field(default_factory=dict)
    preexec_fn: Callable[[], None] | None = None
    on_line: Callable[[subprocess.Popen, str], None] | None = None  # e.g. send a signal at some log line


@dataclass
class Outcome:
    name: str
    exit_code: int | None
    seconds: float
    message: str
    leftovers: str


class Workspace:
    """A scratch folder per case, and the tiny corpus + tokenizer that training cases share."""

    def __init__(self, root: str):
        self.root = root
        self._tiny: tuple[str, str] | None = None

    def folder(self, name: str) -> str:
        path = os.path.join(self.root, re.sub(r"\W+", "_", name))
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def tiny_data(self) -> tuple[str, str]:
        if self._tiny is None:
            self._tiny = make_tiny_data(self.folder("shared-data"))
            build_deepspeed_cpu_op()  # before the disk-full cases: under their file size limit the JIT build fails
        return self._tiny

    def _saved_run(self, name: str, *extra: str) -> str:
        save = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(save, "latest")):
            folder = self.folder(name + "-run")
            command = train(self, folder, 1, "--train-iters", "4", "--save-interval", "2", "--exit-interval", "2",
                            *extra)
            subprocess.run(command, cwd=REPO, env=training_env(), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=TIMEOUT_S)
            shutil.copytree(os.path.join(folder, "ckpt"), save)
        return save

    @property
    def checkpoint(self) -> str:
        """A complete 1-rank checkpoint at iteration 2 of a 4-step run (SAVE_DIR with latest -> global_step2)."""
        return self._saved_run("shared-checkpoint")

    @property
    def other_checkpoint(self) -> str:
        """Another run's checkpoint (another seed): the source of files swapped in."""
        return self._saved_run("other-checkpoint", "--seed", "7")

    @property
    def export(self) -> str:
        """The Hugging Face export (fp32) of `checkpoint`."""
        out = os.path.join(self.root, "shared-export")
        if not os.path.isdir(out):
            subprocess.run(tool("convert_to_hf", "--load", self.checkpoint, "--output", out, "--dtype", "fp32"),
                           cwd=REPO, env=training_env(), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=TIMEOUT_S)
        return out

    @property
    def consolidated(self) -> str:
        """`export` read back into a consolidated folder (model.safetensors + lime_config.json)."""
        out = os.path.join(self.root, "shared-consolidated")
        if not os.path.isdir(out):
            subprocess.run(tool("convert_to_hf", "--from-hf", "--load", self.export, "--output", out), cwd=REPO,
                           env=training_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=TIMEOUT_S)
        return out

    def copy_of(self, source: str, folder: str, name: str) -> str:
        target = os.path.join(folder, name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return target

    def copy_checkpoint(self, folder: str) -> str:
        """A fresh copy of `checkpoint` as FOLDER/ckpt (where train() saves and loads)."""
        target = os.path.join(folder, "ckpt")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.checkpoint, target)
        return target


CASES: dict[str, Callable[[Workspace, str], Run]] = {}


def case(name: str):
    """Register `function(workspace, folder) -> Run` as a case of the table."""

    def register(function: Callable[[Workspace, str], Run]) -> Callable[[Workspace, str], Run]:
        CASES[name] = function
        return function

    return register


# ----------------------------------------------------------------------------------------------
# Helpers for training cases


def make_tiny_data(folder: str) -> tuple[str, str]:
    """The sample corpus (0.2 MB), a 512-piece tokenizer and its preprocessed dataset; (prefix, tokenizer dir)."""
    prefix, tokenizer = os.path.join(folder, "tiny_text_document"), os.path.join(folder, "tokenizer")
    if not os.path.isfile(prefix + ".idx"):
        for command in (
                tool("make_sample_data", "--output-dir", folder, "--max-megabytes", "0.2", "--max-sft-examples", "10"),
                tool("train_tokenizer", "--input", os.path.join(folder, "pretrain.jsonl"), "--output-dir", tokenizer,
                     "--vocab-size", "512"),
                tool("preprocess_data", "--input", os.path.join(folder, "pretrain.jsonl"), "--output-prefix",
                     os.path.join(folder, "tiny"), "--tokenizer-model", tokenizer, "--append-eod", "--workers", "1",
                     "--quiet")):
            subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=TIMEOUT_S)
    return prefix, tokenizer


def build_deepspeed_cpu_op() -> None:
    """Build (about 2 minutes, once per machine) or load DeepSpeed's CPU shared-memory all-reduce op, which
    DeepSpeed JIT-builds at the first CPU launch: under the disk-full cases' file size limit that build fails."""
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; "
                    "ShareMemCommBuilder().load()"], env=training_env(), check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def train(ws: Workspace, folder: str, processes: int, *extra: str, data_path: str | None = None) -> list[str]:
    prefix, tokenizer = ws.tiny_data
    flags = ["--model", "lime-tiny", "--seq-length", "32", "--data-path", data_path or prefix,
             "--tokenizer-model", tokenizer, "--train-iters", "20", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "0", "--split", "100,0,0",
             "--no-bf16", "--num-workers", "2", "--save", os.path.join(folder, "ckpt"),
             "--load", os.path.join(folder, "ckpt"), "--save-interval", "100", *extra]
    if processes == 1:
        return [sys.executable, "pretrain_lime.py", *flags]
    return [sys.executable, "-m", "megatron_lime.training.launch", "--nproc-per-node", str(processes),
            "--master-port", str(free_port()), "pretrain_lime.py", *flags]


def training_env() -> dict[str, str]:
    # DeepSpeed's CPU comm op is JIT-built into TORCH_EXTENSIONS_DIR; one per environment, so that runs from
    # other virtualenvs on the machine (whose build lines differ) do not rebuild it under a case's timer.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions}


def tool(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *args]


def limit_file_size_in(command: list[str], limit: int) -> list[str]:
    """`command` under RLIMIT_FSIZE = limit bytes: writes beyond it fail with EFBIG, as on a full disk."""
    code = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "os.execv(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", code, str(limit), *command]


class RunsCode:
    """Pickled into a checkpoint file: loading it with weights_only=False would create `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def at_iteration(step: int, action: Callable[[subprocess.Popen], None]):
    """on_line callback: run `action` once, when the log shows iteration `step`."""
    done = []

    def on_line(process: subprocess.Popen, line: str) -> None:
        match = re.search(r"iteration\s+(\d+)/", line)
        if not done and match and int(match.group(1)) >= step:
            done.append(True)
            action(process)

    return on_line


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


# ----------------------------------------------------------------------------------------------
# Training: exceptions, a full disk, signals, a killed rank


for _processes in (1, 2):
    _last = _processes - 1

    @case(f"train: exception in a step, {_processes} rank(s)")
    def _step(ws, folder, processes=_processes, last=_last):
        return Run(train(ws, folder, processes), folder, env={"LIME_FAULT_INJECT": f"step:3@{last}"})

    @case(f"train: exception in a DataLoader worker, {_processes} rank(s)")
    def _worker(ws, folder, processes=_processes, last=_last):
        return Run(train(ws, folder, processes), folder, env={"LIME_FAULT_INJECT": f"worker:3@{last}"})

    @case(f"train: disk full during a save, {_processes} rank(s)")
    def _disk_full(ws, folder, processes=_processes):
        return Run(train(ws, folder, processes, "--save-interval", "3"), folder, preexec_fn=limit_file_size)


@case("train: out-of-range token id in the .bin, 2 ranks")
def _out_of_range(ws, folder):
    prefix, _ = ws.tiny_data
    corrupt = os.path.join(folder, "corrupt_text_document")
    shutil.copy(prefix + ".idx", corrupt + ".idx")
    data = bytearray(open(prefix + ".bin", "rb").read())
    for offset in range(0, len(data) - 1, 100):  # every 50th token (uint16 ids); the vocabulary has 512
        data[offset:offset + 2] = (60000).to_bytes(2, "little")
    open(corrupt + ".bin", "wb").write(bytes(data))
    return Run(train(ws, folder, 2, data_path=corrupt), folder)


@case("train: SIGTERM to the launcher mid-run, 2 ranks (must save, exit 0)")
def _sigterm_launcher(ws, folder):
    return Run(train(ws, folder, 2, "--train-iters", "100000"), folder,
               on_line=at_iteration(3, lambda p: p.send_signal(signal.SIGTERM)))


@case("train: SIGTERM to the deepspeed command alone, 2 ranks (it dies at once; the ranks must save, exit)")
def _sigterm_deepspeed_runner(ws, folder):
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               *train(ws, folder, 1, "--train-iters", "100000")[1:]]
    return Run(command, folder, on_line=at_iteration(3, lambda p: p.send_signal(signal.SIGTERM)))


@case("train: rank 1 hung, SIGTERM twice 3 s apart, 2 ranks (the second exits)")
def _sigterm_twice(ws, folder):
    def twice(process):
        __import__("psutil").Process(process.pid).children()[1].send_signal(signal.SIGSTOP)  # rank 0 waits on it
        process.send_signal(signal.SIGTERM)
        time.sleep(3)
        process.send_signal(signal.SIGTERM)

    return Run(train(ws, folder, 2, "--train-iters", "100000"), folder, on_line=at_iteration(3, twice))


@case("train: SIGTERM during start-up, 1 rank")
def _sigterm_startup(ws, folder):
    def on_line(process, line):
        if "data-parallel ranks" in line:  # the first line of main(): datasets and DeepSpeed still to come
            process.send_signal(signal.SIGTERM)

    return Run(train(ws, folder, 1), folder, on_line=on_line)


@case("train: kill -9 of one rank mid-run, 2 ranks")
def _kill_rank(ws, folder):
    def kill_rank_1(process):
        __import__("psutil").Process(process.pid).children()[1].kill()

    return Run(train(ws, folder, 2, "--train-iters", "100000"), folder, on_line=at_iteration(3, kill_rank_1))


# ----------------------------------------------------------------------------------------------
# Preprocessing (tools/preprocess_data.py): damaged, empty and unwritable inputs and outputs


def preprocess(ws: Workspace, folder: str, input_path: str, *extra: str) -> list[str]:
    return tool("preprocess_data", "--input", input_path, "--json-keys", "text", "--tokenizer-model", ws.tiny_data[1],
                "--append-eod", "--workers", "1", "--quiet", "--output-prefix", os.path.join(folder, "out", "ds"),
                *extra)


def jsonl(documents: int) -> bytes:
    return "".join(f'{{"text": "document {i} about files and folders"}}\n' for i in range(documents)).encode()


for _skip in (False, True):

    @case("preprocess: truncated .jsonl.gz" + (" with --skip-bad-records" if _skip else ""))
    def _truncated_gzip(ws, folder, skip=_skip):
        import gzip

        good, truncated = os.path.join(folder, "good.jsonl"), os.path.join(folder, "bad.jsonl.gz")
        open(good, "wb").write(jsonl(50))
        data = gzip.compress(jsonl(2000), mtime=0)
        open(truncated, "wb").write(data[: len(data) // 2])
        return Run(preprocess(ws, folder, os.path.join(folder, "*.jsonl*"), *(["--skip-bad-records"] if skip else [])),
                   folder)


@case("preprocess: empty input (blank lines only)")
def _empty_input(ws, folder):
    path = os.path.join(folder, "empty.jsonl")
    open(path, "w").write("\n\n\n")
    return Run(preprocess(ws, folder, path), folder)


@case("preprocess: disk full while writing the .bin")
def _preprocess_disk_full(ws, folder):
    path = os.path.join(folder, "big.jsonl")
    open(path, "wb").write(jsonl(3000))
    return Run(limit_file_size_in(preprocess(ws, folder, path), 16 * 1024), folder)


# ----------------------------------------------------------------------------------------------
# Checkpoints: resuming (pretrain_lime.py) and converting (tools/convert_to_hf.py)


def resume(ws: Workspace, folder: str, *extra: str) -> list[str]:
    return train(ws, folder, 1, "--train-iters", "4", "--save-interval", "2", *extra)


for _content, _what in (("", "empty"), ("\x00\xff garbage", "garbage")):

    @case(f"resume: {_what} latest")
    def _bad_latest(ws, folder, content=_content):
        open(os.path.join(ws.copy_checkpoint(folder), "latest"), "w", encoding="latin-1").write(content)
        return Run(resume(ws, folder), folder)


@case("resume: tag folder without its model file")
def _tag_without_model(ws, folder):
    os.remove(os.path.join(ws.copy_checkpoint(folder), "global_step2", "mp_rank_00_model_states.pt"))
    return Run(resume(ws, folder), folder)


@case("resume: kill -9 during the first save (half-written tag, must start)")
def _half_written_first_save(ws, folder):
    tag = os.path.join(folder, "ckpt", "global_step2")
    os.makedirs(tag)
    open(os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb").write(b"half")
    return Run(resume(ws, folder, "--exit-interval", "2"), folder)


@case("resume: changed --train-iters and --lr (schedule check)")
def _changed_schedule(ws, folder):
    ws.copy_checkpoint(folder)
    return Run(train(ws, folder, 1, "--train-iters", "6", "--lr", "1e-3"), folder)


@case("resume: RNG state file holding a code-running pickle")
def _malicious_rng(ws, folder):
    import torch

    tag = os.path.join(ws.copy_checkpoint(folder), "global_step2")
    torch.save({"torch": torch.ones(1), "x": RunsCode(os.path.join(folder, "PWNED"))},
               os.path.join(tag, "rng_state_rank0.pt"))
    return Run(resume(ws, folder), folder)


@case("convert: --output is the --load folder, with --overwrite")
def _convert_onto_itself(ws, folder):
    save = ws.copy_checkpoint(folder)
    return Run(tool("convert_to_hf", "--load", save, "--output", save, "--overwrite"), folder)


@case("convert: model states file holding a code-running pickle")
def _convert_malicious(ws, folder):
    import torch

    save = ws.copy_checkpoint(folder)
    torch.save({"module": {}, "x": RunsCode(os.path.join(folder, "PWNED"))},
               os.path.join(save, "global_step2", "mp_rank_00_model_states.pt"))
    os.remove(os.path.join(save, "global_step2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    return Run(tool("convert_to_hf", "--load", save, "--output", os.path.join(folder, "hf")), folder)


@case("convert: truncated model states file")
def _convert_truncated(ws, folder):
    save = ws.copy_checkpoint(folder)
    path = os.path.join(save, "global_step2", "mp_rank_00_model_states.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    os.remove(os.path.join(save, "global_step2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    return Run(tool("convert_to_hf", "--load", save, "--output", os.path.join(folder, "hf")), folder)


# ----------------------------------------------------------------------------------------------
# Integrity: a changed byte, a file from another checkpoint, a truncated export (issue 21)


def flip_byte(path: str) -> None:
    """Change one byte in the middle of the file (for a .pt: inside tensor data, which torch.load accepts)."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


CHECKPOINT_FILES = {"model states": "mp_rank_00_model_states.pt",
                    "optimizer shard": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "RNG state": "rng_state_rank0.pt", "ds_config.json": "ds_config.json"}

for _kind, _name in CHECKPOINT_FILES.items():

    @case(f"resume: flipped byte in the {_kind}")
    def _flipped_resume(ws, folder, name=_name):
        flip_byte(os.path.join(ws.copy_checkpoint(folder), "global_step2", name))
        return Run(resume(ws, folder), folder)

    @case(f"convert: flipped byte in the {_kind}")
    def _flipped_convert(ws, folder, name=_name):
        save = ws.copy_checkpoint(folder)
        flip_byte(os.path.join(save, "global_step2", name))
        return Run(tool("convert_to_hf", "--load", save, "--output", os.path.join(folder, "hf")), folder)


@case("resume: RNG state file from another checkpoint swapped in")
def _swapped_rng(ws, folder):
    save = ws.copy_checkpoint(folder)
    shutil.copy(os.path.join(ws.other_checkpoint, "global_step2", "rng_state_rank0.pt"),
                os.path.join(save, "global_step2", "rng_state_rank0.pt"))
    return Run(resume(ws, folder), folder)


@case("convert: optimizer shard from another checkpoint swapped in")
def _swapped_shard(ws, folder):
    save = ws.copy_checkpoint(folder)
    name = CHECKPOINT_FILES["optimizer shard"]
    shutil.copy(os.path.join(ws.other_checkpoint, "global_step2", name), os.path.join(save, "global_step2", name))
    return Run(tool("convert_to_hf", "--load", save, "--output", os.path.join(folder, "hf")), folder)


@case("generate: flipped byte in the model states")
def _flipped_generate(ws, folder):
    save = ws.copy_checkpoint(folder)
    flip_byte(os.path.join(save, "global_step2", CHECKPOINT_FILES["model states"]))
    return Run(tool("generate", "--load", save, "--prompt", "hello", "--raw", "--max-new-tokens", "4"), folder)


@case("convert: flipped byte in a consolidated model.safetensors")
def _flipped_consolidated(ws, folder):
    consolidated = ws.copy_of(ws.consolidated, folder, "consolidated")
    flip_byte(os.path.join(consolidated, "model.safetensors"))
    return Run(tool("convert_to_hf", "--load", consolidated, "--output", os.path.join(folder, "hf")), folder)


def from_pretrained(export: str) -> list[str]:
    """The export's own loading code (modeling_lime.py, trust_remote_code), as its users run it."""
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)")
    return [sys.executable, "-c", code, export]


@case("from_pretrained: flipped byte in an export's model.safetensors")
def _flipped_export(ws, folder):
    export = ws.copy_of(ws.export, folder, "hf")
    flip_byte(os.path.join(export, "model.safetensors"))
    return Run(from_pretrained(export), folder, env={"HF_HUB_OFFLINE": "1"})


def truncated_export(ws: Workspace, folder: str) -> str:
    """A copy of the export whose model.safetensors lost its last quarter."""
    export = ws.copy_of(ws.export, folder, "hf")
    path = os.path.join(export, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 3 // 4])
    return export


@case("from_pretrained: truncated export model.safetensors")
def _truncated_export(ws, folder):
    return Run(from_pretrained(truncated_export(ws, folder)), folder, env={"HF_HUB_OFFLINE": "1"})


@case("convert --from-hf: truncated export model.safetensors")
def _truncated_export_import(ws, folder):
    export = truncated_export(ws, folder)
    return Run(tool("convert_to_hf", "--from-hf", "--load", export, "--output", os.path.join(folder, "back")), folder)


@case("generate: flipped byte in an export's tokenizer.json")
def _flipped_tokenizer(ws, folder):
    export = ws.copy_of(ws.export, folder, "hf")
    flip_byte(os.path.join(export, "tokenizer.json"))
    return Run(tool("generate", "--load", export, "--prompt", "hello", "--max-new-tokens", "4"), folder)


@case("verify_checkpoint --all: flipped bytes in two files")
def _verify_all(ws, folder):
    save = ws.copy_checkpoint(folder)
    for name in ("rng_state_rank0.pt", "ds_config.json"):
        flip_byte(glob.glob(os.path.join(save, "global_step2", name))[0])
    return Run(tool("verify_checkpoint", save, "--all"), folder)


# ----------------------------------------------------------------------------------------------
# Running and printing


def error_message(output: str) -> str:
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    message = errors[-1] if errors else (lines[-1] if lines else "")
    return message[:150]


def files_under(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files}


def leftover_files(folder: str, before: set[str]) -> str:
    """The files the run added to its folder (and any it removed: a tool must never delete what it did not write)."""
    after = files_under(folder)
    found, removed = sorted(after - before), sorted(before - after)
    text = "none" if not found else \
        f"{len(found)} file(s): " + ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    return text + (f"; REMOVED {len(removed)} input file(s): {removed[0]}, ..." if removed else "")


def run_case(name: str, ws: Workspace) -> Outcome:
    folder = ws.folder(name)
    spec = CASES[name](ws, folder)
    before = files_under(folder)
    env = {**training_env(), **spec.env}
    started = time.monotonic()
    process = subprocess.Popen(spec.command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, preexec_fn=spec.preexec_fn)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if spec.on_line is not None and process.poll() is None:
                spec.on_line(process, line)
            if time.monotonic() - started > TIMEOUT_S:
                break
        process.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
        exit_code = process.returncode
    except subprocess.TimeoutExpired:
        exit_code = None
    while live_processes_in_group(process.pid) and time.monotonic() - started < TIMEOUT_S:
        time.sleep(0.1)
    seconds = time.monotonic() - started
    alive = len(live_processes_in_group(process.pid))
    if alive:
        os.killpg(process.pid, signal.SIGKILL)
    leftovers = leftover_files(folder, before) + (f"; {alive} process(es) still running" if alive else "")
    output = "".join(lines).replace(folder + os.sep, "")  # paths relative to the case's folder: shorter rows
    message = error_message(output) if exit_code != 0 else "(exit 0) " + error_message(output)
    return Outcome(name, exit_code, seconds, message, leftovers)


def print_table(outcomes: list[Outcome]) -> None:
    width = max(len(o.name) for o in outcomes)
    print(f"{'case':{width}}  {'exit':>4}  {'seconds':>7}  message | leftovers")
    for o in outcomes:
        code = "hung" if o.exit_code is None else str(o.exit_code)
        print(f"{o.name:{width}}  {code:>4}  {o.seconds:7.1f}  {o.message} | {o.leftovers}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="pattern", default="", help="Run only the cases whose name contains this.")
    parser.add_argument("--list", action="store_true", help="List the cases and exit.")
    parser.add_argument("--keep", metavar="DIR", help="Work in DIR and keep it (default: a temporary folder).")
    args = parser.parse_args(argv)
    names = [name for name in CASES if args.pattern in name]
    if args.list or not names:
        print("\n".join(names) if names else f"no case matches {args.pattern!r}")
        return 0 if names else 1
    root = args.keep or tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(root, exist_ok=True)
    outcomes = []
    try:
        ws = Workspace(root)
        for index, name in enumerate(names, 1):
            print(f"[{index}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            outcomes.append(run_case(name, ws))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(outcomes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
