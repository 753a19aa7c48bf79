"""python -m petlbench.system.launch MODULE [ARGS...]: tie this process to its parent's life, then run MODULE.

Every child petlbench starts runs through here (petlbench.executors.process.start), so the kernel's parent-death
signal is set within milliseconds of the child's start, before it imports petlbench's modules, torch or timm
(seconds). A parent killed with -9 during those imports therefore takes the child with it at once. Standard library
only, for the same reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import sys

PARENT_PID_ENV = "PETLBENCH_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """In a child: be SIGKILLed by the kernel when the parent dies; exit now if it died already.

    `expected_parent` defaults to `PETLBENCH_PARENT_PID` (set by `start`); without either only the prctl is set.
    Linux only (elsewhere a no-op). The death signal fires when the *thread* that forked this process exits, so
    parents start children from a thread that outlives them (an executor's run thread waits on its child).
    """
    if expected_parent is None:
        value = os.environ.get(PARENT_PID_ENV)
        expected_parent = int(value) if value and value.isdigit() else None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the prctl: nobody waits for this child


def main() -> None:
    die_with_parent()
    if len(sys.argv) < 2:
        print("usage: python -m petlbench.system.launch MODULE [ARGS...]", file=sys.stderr)
        sys.exit(2)
    module = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
