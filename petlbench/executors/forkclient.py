"""Parent side of the fork server (torch-free): start `python -m petlbench.run.forkserver`, ask it for one forked
child per task (a run's worker, or the pre-flight's configuration probe), wait for it with a timeout, kill it.

Why and what it guarantees: docs/scaling.md ("Per-run cost and the fork server"). A sweep owns one pool of servers
(`ForkServers`): the pre-flight probe and then every run lease a server, one child at a time per server, so a sweep
with one run slot imports torch once. `PETLBENCH_FORK_SERVER=0` turns it off; a server that fails to start or dies
turns into the spawn path (a fresh interpreter per child) from then on.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from petlbench.executors.process import TEMP_PREFIX, kill_group, kill_pgid, start, temp_dir

FORK_SERVER_ENV = "PETLBENCH_FORK_SERVER"
# What a server can fork, and the module a fresh interpreter runs for it instead (the spawn path).
WORKER: Final = "worker"
PROBE: Final = "probe"
TARGET_MODULES: Final = {WORKER: "petlbench.run.worker", PROBE: "petlbench.run.probe"}
READY_TIMEOUT_S = 300.0  # the server's imports (torch, timm): seconds, more on a loaded machine
# A server that stops answering is declared dead (killed, and replaced by a new one for the next run):
REPLY_TIMEOUT_S = 30.0  # no pid within this long after a fork request (a fork takes milliseconds)
STOPPED_GRACE_S = 2.0  # stopped (SIGSTOP, SIGTSTP) this long while a reply is due
REAP_TIMEOUT_S = 10.0  # no exit report this long after its worker was killed (timeout, interrupt)
_POLL_S = 0.5  # how often a wait looks at the server's state


def fork_server_enabled(env: Mapping[str, str] | None = None) -> bool:
    """On by default on Linux; `PETLBENCH_FORK_SERVER=0` selects the spawn path."""
    value = (env if env is not None else os.environ).get(FORK_SERVER_ENV, "1")
    return sys.platform.startswith("linux") and value.strip().lower() not in {"0", "false", "no", "off"}


class ServerGone(Exception):
    """The fork server closed its pipe (it died, or was killed)."""


def process_state(pid: int) -> str | None:
    """The state letter of a process in /proc (R running, S sleeping, T stopped, Z zombie, ...); None when it is
    gone or unknown (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return None


class _Lines:
    """Lines from a pipe with a timeout per line (os.read on the fd: no buffered data hidden from select)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def readline(self, timeout: float | None, give_up: Callable[[], bool] | None = None) -> bytes:
        """The next line; TimeoutExpired after `timeout`; ServerGone at end of file, or when `give_up()` says so
        (asked every _POLL_S while nothing arrives)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = left if give_up is None else _POLL_S if left is None else min(left, _POLL_S)
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired("petlbench.run.forkserver", timeout or 0.0)
                if give_up is not None and give_up():
                    raise ServerGone()
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise ServerGone()
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


class ForkServer:
    """One `python -m petlbench.run.forkserver` process, serving one run at a time."""

    def __init__(self, env: Mapping[str, str], python: str, log: Path) -> None:
        self.python = python
        with log.open("wb") as log_file:
            self.proc: subprocess.Popen[bytes] = start(
                [python, "-m", "petlbench.run.forkserver"],
                {**env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
            )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.lines = _Lines(self.proc.stdout.fileno())
        self.log = log
        self.alive = True
        self._stopped_at: float | None = None
        try:
            message = self._read(READY_TIMEOUT_S, self.stopped)
        except (ServerGone, subprocess.TimeoutExpired, ValueError):
            message = {}
        if not message.get("ready"):
            self.close()

    def _read(self, timeout: float | None, give_up: Callable[[], bool] | None = None) -> dict[str, Any]:
        message = json.loads(self.lines.readline(timeout, give_up))
        assert isinstance(message, dict)
        return message

    def stopped(self) -> bool:
        """Whether the server cannot answer: stopped for STOPPED_GRACE_S or more (seen on repeated calls), or dead."""
        state = process_state(self.proc.pid)
        if state is None:  # no /proc entry to read: dead only if it has exited
            return self.proc.poll() is not None
        if state in ("Z", "X"):
            return True
        if state not in ("T", "t"):
            self._stopped_at = None
            return False
        now = time.monotonic()
        if self._stopped_at is None:
            self._stopped_at = now
        return now - self._stopped_at >= STOPPED_GRACE_S

    def answering(self) -> bool:
        """Alive and not stopped now (a server coming back to the pool is checked once, without a grace period)."""
        return self.alive and process_state(self.proc.pid) not in ("T", "t", "Z", "X")

    def spawn(
        self, target: str, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> ForkedChild | None:
        """Fork a child running `target` (WORKER: args spec file, result file; PROBE: request file, answer file);
        None when the server is gone (the caller spawns instead)."""
        if not self.alive:
            return None
        request = {"target": target, "args": list(args), "log": str(log), "env": dict(env or {})}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = int(self._read(REPLY_TIMEOUT_S, self.stopped)["pid"])
        except (OSError, ServerGone, subprocess.TimeoutExpired, ValueError, KeyError):
            self.close()  # declared dead: the caller spawns this child, the pool starts a new server for the next
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
        self.killed = False

    def _gone_unreported(self) -> bool:
        """The server cannot report this child's exit: it is stopped (or dead) and the child has ended."""
        return self.server.stopped() and process_state(self.pid) in (None, "Z", "X")

    def wait(self, timeout: float | None) -> int:
        """Its exit code; after `kill`, at most REAP_TIMEOUT_S for the server to report it, else the server is
        declared dead (closed) and the child counts as killed."""
        if self.code is None:
            if self.killed:
                timeout = REAP_TIMEOUT_S if timeout is None else min(timeout, REAP_TIMEOUT_S)
            try:
                self.code = int(self.server._read(timeout, self._gone_unreported)["exit"])
            except subprocess.TimeoutExpired:
                if not self.killed:
                    raise
                self._server_dead()
            except (ServerGone, ValueError, KeyError):
                self._server_dead()
        assert self.code is not None
        return self.code

    def _server_dead(self) -> None:
        kill_pgid(self.pid)
        self.server.close()
        self.code = -signal.SIGKILL

    def kill(self) -> None:
        """Kill it and its session; the thread that waits on it then reads its exit (this never reads the pipe, so
        another thread may call it)."""
        if self.code is None:
            self.killed = True
            kill_pgid(self.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)  # in case it was killed before its own setsid


class ForkServers:
    """A pool of fork servers, started on first use and leased one child at a time (`lease`).

    The sweep's pre-flight probe and its runs share it, so with one run slot a sweep starts one server. Close it
    (or use it as a context manager) to stop every server and the children they forked.
    """

    def __init__(self, env: Mapping[str, str], python: str = sys.executable) -> None:
        self.env = dict(env)
        self.python = python
        self._lock = threading.Lock()
        self._idle: list[ForkServer] = []
        self._servers: list[ForkServer] = []
        self._closed = False
        self._failed = False
        self._dir: Path | None = None

    def __enter__(self) -> ForkServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> ForkServer | None:
        with self._lock:
            if self._closed or self._failed:
                return None
            while self._idle:
                server = self._idle.pop()
                if server.answering():
                    return server
                server.close()  # stopped or dead while idle: replaced below
            if self._dir is None:
                self._dir = temp_dir(TEMP_PREFIX)
            log = self._dir / f"forkserver-{len(self._servers)}.log"
        server = ForkServer(self.env, self.python, log)
        with self._lock:
            self._servers.append(server)
            if self._closed:
                server.close()
            if not server.alive:
                self._failed = True  # the spawn path from now on
                return None
        return server

    @contextlib.contextmanager
    def lease(self) -> Iterator[ForkServer | None]:
        """A server for one child (None: use the spawn path); back in the pool afterwards if still alive."""
        server = self._start()
        try:
            yield server
        finally:
            if server is not None:
                with self._lock:
                    if server.alive and not self._closed:
                        self._idle.append(server)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            servers = list(self._servers)
        for server in servers:
            server.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@dataclass(frozen=True)
class ChildOutput:
    """What a task child left: its exit code, its answer and its log."""

    code: int
    stdout: str
    log: str


def call_child(
    target: str, request: str, servers: ForkServers | None, timeout_s: float, python: str = sys.executable
) -> ChildOutput:
    """Run a task child (PROBE) on `request` (text): forked from a leased server when there is one, else a fresh
    `python -m <module>` reading the request on stdin. Killed (with everything it started) when it takes longer
    than `timeout_s` (raises subprocess.TimeoutExpired) or when this process is interrupted."""
    if servers is not None:
        with servers.lease() as server:
            if server is not None:
                return _forked_call(server, target, request, timeout_s)
    proc = start(
        [python, "-m", TARGET_MODULES[target]],
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(request, timeout=timeout_s)
    finally:
        kill_group(proc)  # a timeout, an interrupt, or what it left running
    return ChildOutput(proc.returncode, stdout, stderr)


def _forked_call(server: ForkServer, target: str, request: str, timeout_s: float) -> ChildOutput:
    folder = temp_dir(TEMP_PREFIX)
    try:
        request_file, answer_file, log = folder / "request", folder / "answer", folder / "log"
        request_file.write_text(request, encoding="utf-8")
        child = server.spawn(target, [str(request_file), str(answer_file)], log)
        if child is None:  # the server died: a fresh interpreter instead
            return call_child(target, request, None, timeout_s, server.python)
        try:
            code = child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(REAP_TIMEOUT_S)
            raise
        except BaseException:
            child.kill()
            raise
        answer = answer_file.read_text(encoding="utf-8") if answer_file.exists() else ""
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        return ChildOutput(code, answer, text)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
