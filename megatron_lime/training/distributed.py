"""The process group a training run joins: one rank per device, NCCL on GPUs, gloo on CPU (as torchtitan's
distributed/utils.py). init_distributed() joins the group the launcher made (or makes a group of one for a
plain `python ...`); all_reduce_sum() is the one host-side sum over the ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lime.training.launch import free_port  # the launcher's (stdlib only: it never imports torch)


@dataclass
class DistEnv:
    """This rank's place in the process group, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def init_distributed() -> DistEnv:
    """Join the process group the launcher set up (or make a one-process group); NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if "RANK" not in os.environ:  # plain `python ...`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the local ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        if not cuda:
            unlink_deepspeed_cpu_buffer()
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   local_world_size=local_world_size, device=device)


def unlink_deepspeed_cpu_buffer() -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer (CPU runs on one node).

    Why: DeepSpeed's CPU comm op maps a 69 MB /dev/shm file per rank and never unlinks it, so every
    run (and every killed one) leaves 69 MB x ranks of RAM behind until reboot. Once every rank has
    mapped every other rank's buffer (done inside init_distributed; the barrier makes sure), the
    names are no longer needed: the mappings stay valid and the memory is freed when the ranks exit.
    """
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # the ranks span several nodes: DeepSpeed used no shared memory
        pass


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
