"""Session-wide settings of the suite (how it is organised: tests/README.md).

`make test` runs the suite in two pytest-xdist workers (``-n 2 --dist loadscope``: a module's tests
stay in one worker, so its module-scoped trained runs are made once). Each worker computes on one
thread: the suite's models are tiny, where a second thread adds synchronisation, not speed, and two
workers with two threads each would oversubscribe the machine's two cores. Subprocesses the tests
start (kills, locks, ``accelerate launch``) inherit the same one-thread setting.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    # The few tests that ask for two threads (tests/test_split_linear.py) share the cores with the
    # other worker: OpenMP's spinning waits then cost a scheduler slice per parallel region (a 0.3 s
    # test took 37 s); passive waiting sleeps instead. Read by OpenMP when torch starts it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
