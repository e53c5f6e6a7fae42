"""Shared test fixtures."""

import pytest


@pytest.fixture(autouse=True)
def destroy_process_groups():
    """A test that joins a process group in this process leaves none behind (an undestroyed gloo group can
    abort the interpreter at exit: "terminate called without an active exception")."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
