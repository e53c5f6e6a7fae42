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
