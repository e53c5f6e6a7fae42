"""Shared test fixtures."""

import sys

import pytest


@pytest.fixture(autouse=True)
def destroy_process_groups():
    """A test that joins a process group in this process leaves none behind."""
    yield
    dist = sys.modules.get("torch.distributed")  # not imported: nothing to destroy
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shared_memory():
    """Test scripts that call deepspeed.init_distributed themselves (not through our trainer, which
    unlinks them) leave DeepSpeed's 69 MB-per-rank CPU all-reduce buffers in /dev/shm: remove the
    ones this session made, once every test process has ended."""
    import glob
    import os
    import time

    started = time.time()
    yield
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if os.stat(path).st_mtime >= started:
                os.unlink(path)
        except FileNotFoundError:
            pass
