"""Test-session settings.

Under pytest-xdist every worker gets one intra-op thread: each worker's
default (one thread per core) oversubscribes the cores, and OpenMP threads
waiting on each other made the suite several times slower on a 2-core machine.

A run's first checkpoint comes once the work since the start outweighs the
write that the model's size predicts (``run_state.CheckpointClock``): with
the tests' tiny models that is after the first step or the second, as the
machine's load decides. Tests that interrupt a run and resume it rely on the
first step's checkpoint, so the prediction is pinned to "free" here; the
clock's own test sets it back.
"""

import os

import pytest
import torch

from prunekit import run_state

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def first_checkpoint_after_the_first_step(monkeypatch):
    monkeypatch.setattr(run_state.CheckpointClock, "ESTIMATED_BYTES_PER_SECOND", float("inf"))
