"""Child processes petlbench starts (run workers, estimator processes): how they are stopped, in one place."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill a child that leads its own session, and everything it started (even after the leader exited), then reap
    it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
