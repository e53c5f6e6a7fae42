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


@pytest.fixture(scope="session", autouse=True)
def private_tokenizer_cache(tmp_path_factory):
    """Converted sentencepiece forms (tokenizer/conversion_cache.py) go to this session's own folder, inherited by
    the tools the tests run, never to the user's ~/.cache: each run starts cold and leaves nothing behind."""
    import os

    previous = os.environ.get("MEGATRON_LIME_CACHE")
    os.environ["MEGATRON_LIME_CACHE"] = str(tmp_path_factory.mktemp("tokenizer-cache"))
    yield
    if previous is None:
        os.environ.pop("MEGATRON_LIME_CACHE", None)
    else:
        os.environ["MEGATRON_LIME_CACHE"] = previous
