"""Child processes petlbench starts (run workers, the fork server, estimator processes): how they are started,
tied to their parent's life, stopped, and how their deaths are told apart — in one place.

- `start` runs a command in a session of its own (Ctrl-C reaches only the parent, which stops the child cleanly)
  and tells it the parent's PID (`PETLBENCH_PARENT_PID`); a `python -m MODULE` child starts through
  `petlbench.system.launch`, which calls `die_with_parent` before MODULE imports anything.
- `die_with_parent` (petlbench/system/launch.py) asks the Linux kernel to SIGKILL the child when its parent dies
  (`prctl(PR_SET_PDEATHSIG)`), and exits at once if the parent is already gone (the race between fork and prctl).
  A `petlbench run` killed by -9 therefore takes its workers with it; see docs/guarantees.md for limits.
- `kill_group` kills a child and everything it started.
- `oom_kills` reads the cgroup's OOM-kill counter, so a SIGKILL from the kernel's OOM killer is recorded as `oom`.
- `temp_dir` / `clean_stale_temp`: temp folders named after their owner's PID, removed once that owner is dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any

from petlbench.system.launch import PARENT_PID_ENV as PARENT_PID_ENV  # re-exported: children use them from here
from petlbench.system.launch import die_with_parent as die_with_parent

RUNS_IN_FLIGHT_ENV = "PETLBENCH_RUNS_IN_FLIGHT"  # runs executing when a worker started: recorded on its row
_PR_SET_NAME = 15

TEMP_PREFIX = "petlbench-run-"  # + owner PID: a folder left by a parent killed with -9 goes at the next run


def start(
    command: list[str],
    env: Mapping[str, str],
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Start a petlbench child in its own session, told who its parent is. A `python -m MODULE` command runs
    through `petlbench.system.launch`, which sets the parent-death signal before MODULE imports anything."""
    if len(command) >= 3 and command[1] == "-m":
        command = [command[0], "-m", "petlbench.system.launch", *command[2:]]
    return subprocess.Popen(
        command,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        text=text,
        env={**env, PARENT_PID_ENV: str(os.getpid())},
        start_new_session=True,
    )


WORKER_NAME = "petlbench-run"  # a forked worker's process name (/proc/PID/comm), as `ps -o comm` shows it


def set_process_name(name: str) -> None:
    """Name this process in /proc/PID/comm (15 bytes): a forked worker keeps its server's command line, so this is
    how ps, top and the tests tell it from the server. Linux only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill a child that leads its own session, and everything it started (even after the leader exited), then reap
    it."""
    kill_pgid(proc.pid)
    proc.wait()


def kill_pgid(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM behaves like Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop like Ctrl-C (workers killed, finished rows kept), but exit 143 (128 + 15)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread (as SIGINT raises KeyboardInterrupt)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test runner): leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------------------------
# The kernel OOM killer


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 memory path) of this process, from /proc/self/cgroup."""
    v2: str | None = None
    v1: str | None = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def oom_kills(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """How many processes the kernel OOM killer has killed in this process's memory cgroup (None: unknown).

    cgroup v2: `oom_kill` in `<root>/<path>/memory.events`; v1: `oom_kill` in `<root>/memory/<path>/memory.oom_control`.
    Inside a container the path in /proc/self/cgroup may be the host's, so the cgroup root itself is tried too.
    """
    v2, v1 = _cgroup_paths(proc_cgroup)
    candidates: list[Path] = []
    if v2 is not None:
        candidates += [root / v2.lstrip("/") / "memory.events", root / "memory.events"]
    if v1 is not None:
        candidates += [root / "memory" / v1.lstrip("/") / "memory.oom_control", root / "memory" / "memory.oom_control"]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def killed_by_oom_killer(code: int, before: int | None, after: int | None) -> bool:
    """A child that died of SIGKILL while the cgroup's OOM-kill counter went up was killed for memory.

    With several runs at once in one cgroup, another run's OOM kill in the same window can be attributed to a run
    that was SIGKILLed for another reason (rare: only SIGKILL deaths are considered).
    """
    return code == -signal.SIGKILL and before is not None and after is not None and after > before


# ---------------------------------------------------------------------------------------------------------------
# Temp folders


def temp_dir(prefix: str) -> Path:
    """A fresh temp folder `<prefix><pid>-<random>` owned by this process; `clean_stale_temp` removes it after us."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(prefix: str, where: Path | None = None) -> list[Path]:
    """Remove `<prefix><pid>-*` temp folders whose owner PID is dead (a parent killed by -9); returns them."""
    base = Path(where or tempfile.gettempdir())
    removed = []
    try:
        entries = list(base.glob(f"{prefix}*"))
    except OSError:
        return []
    for path in entries:
        match = re.fullmatch(re.escape(prefix) + r"(\d+)-.*", path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
