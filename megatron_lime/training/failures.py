"""How a training process ends: on success, on an error, on a signal. Every rank exits, promptly.

`run_guarded(main, argv)` runs the entry point and owns its ending:

- success: leftover DataLoader workers are stopped and the process group is destroyed while the
  interpreter is still whole, not left to its exit.
- an exception on any rank: the first failing rank prints its traceback once, with its rank (for bad
  input, a LimeInputError, its one line `error: <message>` instead: megatron_lime/errors.py); a rank
  that fails because of it (a peer's socket closed under a collective) prints one line naming the
  first failing rank. The first is agreed on through the c10d store the process group already runs
  (MASTER_ADDR:MASTER_PORT). Then the rank kills its DataLoader workers and leaves with os._exit(1):
  nothing (a worker join at exit, a collective, a destructor) can keep it alive. The launcher stops the other ranks
  (megatron_lime.training.launch, or DeepSpeed's, both do).
- SIGTERM / SIGINT: inside the training loop (from `TerminationRequest()` on) the first one asks the
  loop to save after the current step and exit 0. Anywhere else (start-up, while an error is being
  reported), or again more than REPEAT_WINDOW_S after the first, it exits at once with 128 + signal.
  Repeats within the window are the same request delivered twice (the scheduler or terminal signals
  every process, and the launcher forwards its own copy), so they do not escalate.
  Signals are read by a thread from signal.set_wakeup_fd, so this works even while the main thread
  waits inside a collective, where a Python signal handler would not run.

DataLoader workers ignore SIGTERM/SIGINT (megatron_lime/training/data.py): a signal for the whole
process tree must not kill them while their rank still saves (torch turns a dead worker into an error
raised in the rank at a random point). They die with their rank instead: PR_SET_PDEATHSIG, and the
exits above kill them explicitly before leaving.

Test hook: LIME_FAULT_INJECT=POINT:N[@RANK] raises InjectedFault at the Nth pass through POINT in a
process (on rank RANK only when given): `step` (start of the Nth optimizer step of this process) or
`worker` (while collating the Nth micro-batch, inside the DataLoader worker when --num-workers > 0).
Read only by `inject_fault`; unset, it costs one environment lookup per step and per batch.
Used by tests/test_failures.py and tests/reliability/fault_injection.py.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Callable

from megatron_lime.errors import LimeInputError, input_error_line

REPEAT_WINDOW_S = 2.0
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FAULT_ENV = "LIME_FAULT_INJECT"
FIRST_FAILURE_KEY = "megatron_lime/first_failed_rank"
PR_SET_PDEATHSIG = 1


class InjectedFault(RuntimeError):
    """Raised by inject_fault (tests and the fault-injection table only)."""


_fault_counts: dict[str, int] = {}


def inject_fault(point: str) -> None:
    """Raise InjectedFault at the pass through `point` that LIME_FAULT_INJECT names (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, count = spec.partition(":")
    count, _, rank = count.partition("@")
    if where != point or (rank and rank != os.environ.get("RANK", "0")):
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(count):
        raise InjectedFault(f"{FAULT_ENV}={spec}: injected fault at {point} {count}")


# ----------------------------------------------------------------------------------------------
# Signals


class _Signals:
    """What a SIGTERM/SIGINT means now: `phase` is "start", "loop", "failing" or "done"."""

    def __init__(self):
        self.phase = "start"
        self.signal_number: int | None = None
        self.first_at = 0.0
        self.installed = False

    def install(self) -> None:
        """Route SIGTERM/SIGINT to a watcher thread (main thread only; idempotent)."""
        if self.installed:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for sig in TERMINATION_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)  # the C-level handler writes the wakeup fd
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="lime-signals", daemon=True).start()
        self.installed = True

    def _watch(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):  # the wakeup fd carries every handled signal, SIGCHLD included
                if signum in TERMINATION_SIGNALS:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.phase == "loop" and self.signal_number is None:
            self.signal_number, self.first_at = signum, now
            _say(f"{name}: saving a checkpoint after this step, then exiting "
                 f"(a signal {REPEAT_WINDOW_S:.0f} s or more from now exits without saving)")
            return
        if self.phase == "loop" and now - self.first_at < REPEAT_WINDOW_S:
            return
        where = {"start": "during start-up", "loop": "again", "failing": "while stopping after an error",
                 "done": "while shutting down"}[self.phase]
        _say(f"{name} {where}: exiting now" + (" without saving" if self.phase == "loop" else ""))
        _exit_now(128 + signum)


_signals = _Signals()


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (Linux /proc), None if it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
    except (OSError, IndexError, ValueError):
        return None


class _DeepSpeedCommandWatch:
    """Notices when the `deepspeed` command that started this rank has ended.

    DeepSpeed's single-node runner installs no signal handler: `kill PID`, `timeout` or a scheduler that
    signals only the main process end it at once (status -15) and nobody tells the ranks, which would
    train on as orphans. Its per-node launcher (deepspeed.launcher.launch, this rank's parent) stays
    up, re-parented; so the runner is gone exactly when the launcher's parent is no longer the runner.
    """

    def __init__(self):
        self.launcher = os.getppid()
        self.runner = None
        try:
            with open(f"/proc/{self.launcher}/cmdline", "rb") as cmdline:
                started_by_deepspeed = b"deepspeed.launcher.launch" in cmdline.read().split(b"\0")
        except OSError:
            started_by_deepspeed = False
        if started_by_deepspeed:
            self.runner = _parent_of(self.launcher)

    def runner_ended(self) -> bool:
        """One small /proc read; False when this rank was not started by the `deepspeed` command.

        Also True when the per-node launcher itself is gone (this rank was re-parented): nobody would
        stop the ranks then either.
        """
        if self.runner in (None, 1):
            return False
        return os.getppid() != self.launcher or _parent_of(self.launcher) != self.runner


class TerminationRequest:
    """Created where the training loop starts: from then on a signal means "save after this step and exit".

    So does the end of the `deepspeed` command that started the ranks (see _DeepSpeedCommandWatch).
    """

    def __init__(self):
        _signals.install()
        _signals.phase = "loop"
        self._deepspeed_command = _DeepSpeedCommandWatch()

    @property
    def signal_number(self) -> int | None:
        return _signals.signal_number

    def requested(self, device) -> bool:
        """True on every rank as soon as any rank got a signal (one tiny all-reduce per step)."""
        import torch
        import torch.distributed as dist

        if _signals.signal_number is None and self._deepspeed_command.runner_ended():
            _signals.signal_number, _signals.first_at = signal.SIGTERM, time.monotonic()
            _say(f"the deepspeed command (pid {self._deepspeed_command.runner}) has ended without stopping its "
                 "ranks (SIGTERM to it alone?): saving a checkpoint after this step, then exiting")
        flag = torch.tensor([1.0 if _signals.signal_number is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# Ending a process


def _rank_prefix() -> str:
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _say(message: str) -> None:
    """One line on stderr without Python's stream locks (safe from the watcher thread at any moment)."""
    os.write(2, f"{_rank_prefix()}{message}\n".encode())


def _stop_children() -> None:
    """SIGKILL the DataLoader workers (and any other multiprocessing child) of this process."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
            child.join(timeout=5)
        except Exception:  # already gone, or being reaped by another thread
            pass


def _exit_now(status: int) -> None:
    _stop_children()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this process when its parent dies (Linux; elsewhere torch's watchdog remains)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def _is_peer_failure(error: BaseException) -> bool:
    """An error that only says another rank is gone (gloo's closed socket, NCCL/c10d errors)."""
    import torch.distributed as dist

    text = str(error)
    return (isinstance(error, dist.DistError) or "Connection closed by peer" in text
            or "Connection reset by peer" in text)


def _first_failing_rank(rank: int) -> int | None:
    """The first rank to fail, agreed on in the process group's c10d store; None if the store is gone."""
    import torch.distributed as dist

    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    try:
        # The store lives in rank 0's process, which may be the one that failed: probe with a plain socket
        # first (refused at once) rather than let the store's client retry and log C++ stack frames.
        socket.create_connection(address, timeout=3).close()
        store = dist.TCPStore(*address, is_master=False, timeout=timedelta(seconds=3), wait_for_workers=False)
        return int(store.compare_set(FIRST_FAILURE_KEY, "", str(rank)))
    except Exception:
        return None


def _fail(error: BaseException) -> None:
    """Report `error` (once across ranks) and exit 1; never returns."""
    _signals.phase = "failing"
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise again when we kill workers
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    first = _first_failing_rank(rank) if world_size > 1 else rank
    if first == rank or (first is None and not _is_peer_failure(error)):
        if isinstance(error, LimeInputError):
            report = input_error_line(error) + "\n"
        else:
            report = "".join(traceback.format_exception(error))
        if world_size > 1:
            report = f"[rank {rank}] failed; stopping every rank:\n{report}"
        sys.stderr.write(report)
    else:
        summary = (str(error).strip().splitlines() or [""])[0][:200]
        who = f"rank {first} failed first (its error is above)" if first is not None else "another rank failed"
        sys.stderr.write(f"[rank {rank}] stopped: {who}; here: {type(error).__name__}: {summary}\n")
    _exit_now(1)


def _finish() -> None:
    """The end of a run that returned: no worker left behind, the process group destroyed."""
    import torch.distributed as dist

    _signals.phase = "done"
    gc.collect()  # DataLoader iterators still referenced from cycles shut their workers down in __del__
    if multiprocessing.active_children():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _stop_children()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_guarded(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """main(argv)'s exit status; any exception is reported once and ends the process with status 1."""
    _signals.install()
    try:
        status = main(argv)
    except SystemExit:  # argparse: --help, or a usage error (each rank prints it, as argparse does)
        _finish()
        raise
    except BaseException as error:
        _fail(error)
    _finish()
    return status
