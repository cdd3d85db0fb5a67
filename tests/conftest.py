"""Test-session settings.

Under pytest-xdist every worker gets one intra-op thread: each worker's
default (one thread per core) oversubscribes the cores, and OpenMP threads
waiting on each other made the suite several times slower on a 2-core machine.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
