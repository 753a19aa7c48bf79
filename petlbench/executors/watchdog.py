"""A watchdog that outlives its parent and kills, by PID, every process the parent started, when the parent dies.

    python -m petlbench.executors.watchdog PARENT_PID      (started by `start_watchdog`)

Why: the kernel's parent-death signal (petlbench.executors.process) covers the children petlbench starts itself.
A library that starts its own daemons does not set it: a local Ray instance (`--executor ray` without `--address`)
starts gcs_server, raylet, a dashboard agent and a runtime-env agent, and only a graceful `ray.shutdown()` stops
them; after `kill -9` of `petlbench run` the agents (about 85 MB each) would live on, reparented to PID 1.

How: the watchdog runs in a session of its own (a signal to the parent's process group does not reach it) and
holds the read end of a pipe whose write end only the parent holds. Every POLL_S it records every descendant of the
parent (from /proc: PID and start time, so a reused PID is never killed), keeping processes it saw once even after
their own parent exits. When the pipe reaches end of file without the word `stop` first, the parent is dead (the
kernel closes the pipe even on kill -9): it SIGKILLs every recorded process still alive. A clean shutdown writes
`stop`, and the watchdog exits without killing anything. Linux only (elsewhere `start_watchdog` starts nothing).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Final

POLL_S: Final = 0.5
STOP: Final = b"stop\n"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks since boot) of a process; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """Every living descendant of `root`: PID → start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append((int(entry), info[1]))
    found: dict[int, int] = {}
    pending = [root]
    while pending:
        for pid, started in children.get(pending.pop(), []):
            if pid not in found:
                found[pid] = started
                pending.append(pid)
    return found


def kill_recorded(recorded: dict[int, int]) -> list[int]:
    """SIGKILL every recorded process that is still the same process (same start time); the PIDs killed."""
    killed = []
    for pid, started in recorded.items():
        info = _stat(pid)
        if info is not None and info[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def watch(parent: int, pipe: int) -> int:
    """Record the parent's descendants until the pipe ends; kill them unless the parent said `stop` first."""
    me = os.getpid()
    parent_info = _stat(parent)
    recorded: dict[int, int] = {}
    received = b""
    while True:
        if parent_info is None or _stat(parent) != parent_info:  # gone (its PID may even be someone else's now)
            kill_recorded(recorded)
            return 0
        seen = descendants(parent)
        seen.pop(me, None)
        recorded = {pid: started for pid, started in recorded.items() if _stat(pid) is not None} | seen
        ready, _, _ = select.select([pipe], [], [], POLL_S)
        if not ready:
            continue
        chunk = os.read(pipe, 64)
        if chunk:
            received += chunk
            continue
        if STOP not in received:  # the pipe closed without `stop`: the parent died (even by kill -9)
            kill_recorded(recorded)
        return 0


class Watchdog:
    """The parent's handle: `stop()` on a clean shutdown (nothing is killed); if this process dies instead, the
    watchdog kills what it started."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def stop(self) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        with contextlib.suppress(OSError):
            if stdin is not None:
                stdin.write(STOP)
                stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_watchdog(python: str = sys.executable) -> Watchdog | None:
    """Start a watchdog over this process's descendants (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    proc = subprocess.Popen(
        [python, "-m", "petlbench.executors.watchdog", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in this process's group: Ctrl-C and a group kill leave it watching
        close_fds=True,
    )
    return Watchdog(proc)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the parent, which then says stop
    return watch(int(argv[0]), sys.stdin.fileno())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
