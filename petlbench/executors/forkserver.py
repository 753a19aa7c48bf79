"""Parent side of the fork server (torch-free): start `python -m petlbench.forkserver`, ask it for one forked worker
per run, wait for that worker with a timeout, kill it.

Why and what it guarantees: docs/scaling.md ("Per-run cost and the fork server"). One server per run slot (a thread
of the local executor), so a server only ever has one worker at a time. `PETLBENCH_FORK_SERVER=0` turns it off;
a server that fails to start or dies turns into the spawn path (a fresh interpreter per run) for that slot.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from petlbench.executors.process import TEMP_PREFIX, kill_group, kill_pgid, start, temp_dir

FORK_SERVER_ENV = "PETLBENCH_FORK_SERVER"
READY_TIMEOUT_S = 300.0  # the server's imports (torch, timm): seconds, more on a loaded machine


def fork_server_enabled(env: Mapping[str, str] | None = None) -> bool:
    """On by default on Linux; `PETLBENCH_FORK_SERVER=0` selects the spawn path."""
    value = (env if env is not None else os.environ).get(FORK_SERVER_ENV, "1")
    return sys.platform.startswith("linux") and value.strip().lower() not in {"0", "false", "no", "off"}


class ServerGone(Exception):
    """The fork server closed its pipe (it died, or was killed)."""


class _Lines:
    """Lines from a pipe with a timeout per line (os.read on the fd: no buffered data hidden from select)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def readline(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired("petlbench.forkserver", timeout or 0.0)
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise ServerGone()
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


class ForkServer:
    """One `python -m petlbench.forkserver` process, serving one run at a time."""

    def __init__(self, env: Mapping[str, str], python: str, log: Path) -> None:
        with log.open("wb") as log_file:
            self.proc: subprocess.Popen[bytes] = start(
                [python, "-m", "petlbench.forkserver"],
                {**env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
            )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.lines = _Lines(self.proc.stdout.fileno())
        self.log = log
        self.alive = True
        try:
            message = self._read(READY_TIMEOUT_S)
        except (ServerGone, subprocess.TimeoutExpired, ValueError):
            message = {}
        if not message.get("ready"):
            self.close()

    def _read(self, timeout: float | None) -> dict[str, Any]:
        message = json.loads(self.lines.readline(timeout))
        assert isinstance(message, dict)
        return message

    def spawn(self, spec_file: Path, out_file: Path, log: Path, env: Mapping[str, str]) -> ForkedChild | None:
        """Fork a worker for one run; None when the server is gone (the caller spawns instead)."""
        if not self.alive:
            return None
        request = {"spec": str(spec_file), "out": str(out_file), "log": str(log), "env": dict(env)}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = int(self._read(READY_TIMEOUT_S)["pid"])
        except (OSError, ServerGone, subprocess.TimeoutExpired, ValueError, KeyError):
            self.close()
            return None
        return ForkedChild(self, pid)

    def close(self) -> None:
        """Kill the server; a worker it forked dies with it (its parent-death signal)."""
        self.alive = False
        kill_group(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


class ForkedChild:
    """A worker forked by a fork server: it leads its own session (pgid = pid); the server reaps it."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.code: int | None = None

    def wait(self, timeout: float | None) -> int:
        if self.code is None:
            try:
                self.code = int(self.server._read(timeout)["exit"])
            except (ServerGone, ValueError, KeyError):
                kill_pgid(self.pid)
                self.server.close()
                self.code = -9
        return self.code

    def kill(self) -> None:
        """Kill it and its session; the thread that waits on it then reads its exit (this never reads the pipe, so
        another thread may call it)."""
        if self.code is None:
            kill_pgid(self.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)  # in case it was killed before its own setsid


class ForkServers:
    """A fork server per thread that asks for one (the executor's run slots), started on first use."""

    def __init__(self, env: Mapping[str, str], python: str = sys.executable) -> None:
        self.env = dict(env)
        self.python = python
        self._lock = threading.Lock()
        self._local = threading.local()
        self._servers: list[ForkServer] = []
        self._closed = False
        self._dir: Path | None = None

    def get(self) -> ForkServer | None:
        server: ForkServer | None = getattr(self._local, "server", None)
        if server is not None and server.alive:
            return server
        if getattr(self._local, "failed", False):
            return None  # this slot's server died once: the spawn path from now on
        with self._lock:
            if self._closed:
                return None
            if self._dir is None:
                self._dir = temp_dir(TEMP_PREFIX)
            log = self._dir / f"forkserver-{len(self._servers)}.log"
        server = ForkServer(self.env, self.python, log)
        with self._lock:
            self._servers.append(server)
            if self._closed:
                server.close()
        self._local.server = server
        if not server.alive:
            self._local.failed = True
            return None
        return server

    def close(self) -> None:
        with self._lock:
            self._closed = True
            servers = list(self._servers)
        for server in servers:
            server.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
