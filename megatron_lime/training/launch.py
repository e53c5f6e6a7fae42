"""The per-node launcher: start this node's ranks, stop them all when one fails, let them save on SIGTERM.

    python -m megatron_lime.training.launch --nproc-per-node 8 SCRIPT [script arguments]
    python -m megatron_lime.training.launch --nproc-per-node 8 --nnodes 2 --node-rank 1 \\
        --master-addr node0 --master-port 29500 SCRIPT [script arguments]

Each rank runs `python -u SCRIPT --local_rank=N [script arguments]` with the environment of DeepSpeed's
launcher (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
CROSS_RANK, CROSS_SIZE), so SCRIPT runs unchanged under either. It exists because the stock launchers
cannot be preempted safely: on SIGTERM DeepSpeed's per-node launcher (deepspeed.launcher.launch) and
torchrun give the ranks 30 s and then SIGKILL them, whatever the checkpoint needs, and the single-node
`deepspeed` runner dies at once without waiting for (or telling) its ranks; they notice it is gone and
save (failures.py), but the command has already returned. Here:

- SIGTERM / SIGINT: forwarded to every rank; the launcher waits for all of them however long the
  save takes (the scheduler's kill timeout is the limit; size SLURM's --signal lead time to the save).
  A signal repeated later is forwarded again (the ranks then exit without saving); a third time,
  the ranks are SIGKILLed.
- a rank exits non-zero: the others get FAILED_RANK_GRACE_S to exit on their own (with gloo they see
  the closed socket at once; with NCCL they may wait in a collective), then SIGKILL. The launcher
  exits with the first failing rank's status.
- the launcher dies (SIGKILL): its ranks get SIGKILL from the kernel (PR_SET_PDEATHSIG), so no rank
  outlives its launcher. A rank's DataLoader workers die with it the same way.

Standard library only, so it also runs as a plain file: `python megatron_lime/training/launch.py ...`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

FAILED_RANK_GRACE_S = 5.0
POLL_S = 0.1
PR_SET_PDEATHSIG = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc-per-node", type=int, default=1, help="Ranks to start on this node.")
    parser.add_argument("--nnodes", type=int, default=1, help="Nodes in the job (each runs this launcher).")
    parser.add_argument("--node-rank", type=int, default=0, help="This node's index, 0..nnodes-1.")
    parser.add_argument("--master-addr", default="127.0.0.1", help="Host of rank 0 (the c10d store).")
    parser.add_argument("--master-port", type=int, default=29500, help="Port of the c10d store on --master-addr.")
    parser.add_argument("script", help="The training script; run with python on every rank.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Arguments passed to the script.")
    return parser.parse_args(argv)


def _die_with_launcher() -> None:
    """preexec_fn of every rank: the kernel SIGKILLs the rank when the launcher dies (Linux)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass


def _say(message: str) -> None:
    print(f"[launcher] {message}", file=sys.stderr, flush=True)


def start_ranks(args: argparse.Namespace) -> list[subprocess.Popen]:
    world_size = args.nproc_per_node * args.nnodes
    ranks = []
    for local_rank in range(args.nproc_per_node):
        rank = args.node_rank * args.nproc_per_node + local_rank
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
               "LOCAL_SIZE": str(args.nproc_per_node), "LOCAL_WORLD_SIZE": str(args.nproc_per_node),
               "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(args.master_port),
               "CROSS_RANK": str(args.node_rank), "CROSS_SIZE": str(args.nnodes)}
        command = [sys.executable, "-u", args.script, f"--local_rank={local_rank}", *args.script_args]
        ranks.append(subprocess.Popen(command, env=env, preexec_fn=_die_with_launcher))
    return ranks


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def supervise(ranks: list[subprocess.Popen], first_rank: int = 0) -> int:
    """Wait for every rank; forward signals; stop the others when one fails. Returns the launcher's status."""
    signals_received = []

    def forward(signum, frame):
        signals_received.append(signum)
        name = signal.Signals(signum).name
        if len(signals_received) >= 3:
            _say(f"{name} a third time: killing the ranks")
            for rank in ranks:
                rank.poll() is None and rank.kill()
            return
        _say(f"{name}: forwarded to the ranks; waiting for them to save and exit"
             + (" (again: they exit without saving)" if len(signals_received) == 2 else
                " (send it again to stop them without saving)"))
        for rank in ranks:
            rank.poll() is None and rank.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    failed: tuple[int, int] | None = None  # (rank, status) of the first rank to exit non-zero
    kill_at: float | None = None
    while [rank.poll() for rank in ranks].count(None):  # poll every rank: any() would stop at the first alive
        if failed is None:
            for index, rank in enumerate(ranks):
                if rank.returncode:
                    failed = (first_rank + index, exit_status(rank.returncode))
                    kill_at = time.monotonic() + FAILED_RANK_GRACE_S
                    if any(other.poll() is None for other in ranks):
                        _say(f"rank {failed[0]} exited with status {failed[1]}; stopping the other ranks")
                    break
        if kill_at is not None and time.monotonic() > kill_at:
            for rank in ranks:
                rank.poll() is None and rank.kill()
        time.sleep(POLL_S)
    if failed is None:
        failed = next(((first_rank + i, exit_status(r.returncode)) for i, r in enumerate(ranks) if r.returncode),
                      None)
    return failed[1] if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return supervise(start_ranks(args), first_rank=args.node_rank * args.nproc_per_node)


def free_port() -> int:
    """A free TCP port for a rendezvous: several runs on one machine must not share the default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_processes_in_group(group: int) -> list[int]:
    """Processes (zombies aside) still in process group `group`: what a run left behind."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == group and fields[0] != "Z":
                alive.append(int(entry))
    return alive


if __name__ == "__main__":
    sys.exit(main())
