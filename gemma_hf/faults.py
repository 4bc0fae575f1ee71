"""Fault injection for the kill-anywhere tests, in one place below everything that writes a run.

``GEMMA_HF_KILL_AT=NAME`` kills the process with SIGKILL (no cleanup, like a power cut or the OOM
killer) when it reaches :func:`fault_point` ``NAME``; inside a pipeline (``GEMMA_HF_STAGE`` set by
the pipeline for each stage) ``GEMMA_HF_KILL_AT=STAGE:NAME`` fires only in that stage. Unset, a
fault point costs two environment lookups.

Only the standard library is imported here.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "GEMMA_HF_KILL_AT"
STAGE = "GEMMA_HF_STAGE"


def fault_point(name: str) -> None:
    target = os.environ.get(KILL_AT)
    if target is None:
        return
    stage = os.environ.get(STAGE)
    if target == name if stage is None else target in (name, f"{stage}:{name}"):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["fault_point", "KILL_AT", "STAGE"]
