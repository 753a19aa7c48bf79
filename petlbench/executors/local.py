"""Local executor: one worker process per run, with a wall-clock timeout.

Each worker is forked from a fork server that imported torch and timm once (`forkserver.py`; docs/scaling.md), or,
with `PETLBENCH_FORK_SERVER=0` and on Ray nodes, a fresh `python -m petlbench.run.worker` interpreter. Either way a
run gets its own process, CUDA context and caching allocator, so one run's fragmentation or OOM never leaks into
the next. The child's stdout/stderr go to `results/<suite>/logs/<run_id>.log`. Workers die with their parent
(`process.die_with_parent`), and a SIGKILL from the kernel's OOM killer is recorded as `oom`.

Runs go `jobs` at a time through a thread pool (a thread only waits on its child): a CUDA run leases one GPU
from a `DevicePool` and its child sees only that GPU; with more than one job, each child gets an equal share of
the CPU cores as its thread budget. An interrupt kills every running child and starts nothing new.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from petlbench.errors import ConfigError
from petlbench.executors.devices import DevicePool, gpu_env, thread_env, threads_per_run
from petlbench.executors.events import RunEvent, RunFinished, RunStarted
from petlbench.executors.forkclient import REAP_TIMEOUT_S, WORKER, ForkServer, ForkServers, fork_server_enabled
from petlbench.executors.process import (
    RUNS_IN_FLIGHT_ENV,
    TEMP_PREFIX,
    clean_stale_temp,
    kill_group,
    kill_pgid,
    killed_by_oom_killer,
    oom_kills,
    start,
    temp_dir,
)
from petlbench.results import RunResult, failed_result, suite_dir
from petlbench.spec.models import RunSpec
from petlbench.system.safeio import move_into, open_log, subfolder
from petlbench.why import SNAPSHOT_DIR

TAIL_LINES = 20
TAIL_CHARS = 2000
LOG_LIMIT = 1 << 20  # a run on another node sends back at most the last MiB of its log


LOG_DIR = "logs"


def log_path(results_dir: Path, spec: RunSpec) -> Path:
    return suite_dir(results_dir, spec.suite) / LOG_DIR / f"{spec.run_id}.log"


def log_folder(results_dir: Path, spec: RunSpec) -> Path:
    """results/<suite>/logs/, created; an OSError when it is a symlink (petlbench.system.safeio)."""
    folder = suite_dir(results_dir, spec.suite)
    folder.mkdir(parents=True, exist_ok=True)
    return subfolder(folder, LOG_DIR)


def keep_snapshot(result: RunResult, results_dir: Path) -> RunResult:
    """Move a CUDA memory snapshot out of the worker's temp folder to results/<suite>/snapshots/<run_id>.pickle."""
    if result.snapshot_file is None or not Path(result.snapshot_file).is_file():
        return result.model_copy(update={"snapshot_file": None})
    folder = subfolder(suite_dir(results_dir, result.spec.suite), SNAPSHOT_DIR)
    target = folder / f"{result.run_id}.pickle"
    move_into(Path(result.snapshot_file), target)  # replaces a link at `target`, never moves into what it points at
    return result.model_copy(update={"snapshot_file": str(target)})


def log_tail(path: Path) -> str:
    """The last lines of a worker log (what a user needs to see why a run died)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.rstrip().splitlines()[-TAIL_LINES:])
    return tail[-TAIL_CHARS:]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class Child(Protocol):
    """A running worker, however it was started (spawned interpreter or forked from the fork server)."""

    pid: int  # also its process group: it leads its own session

    def wait(self, timeout: float | None) -> int:
        """Its exit code (negative: killed by that signal); raises subprocess.TimeoutExpired."""
        ...

    def kill(self) -> None:
        """Kill it and everything it started (any thread may call it); `wait` then returns soon."""
        ...


class SpawnedChild:
    """`python -m petlbench.run.worker` in a fresh interpreter (the fallback, and the only path on Ray nodes)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def wait(self, timeout: float | None) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        kill_group(self.proc)


class Children:
    """The workers running now, so that an interrupt in the main thread can kill them all.

    After `close()` nothing new may run: a child registered later is killed at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[Child] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, proc: Child) -> None:
        with self._lock:
            if not self._closed:
                self._procs.add(proc)
                return
        proc.kill()

    def running(self) -> int:
        with self._lock:
            return len(self._procs)

    def discard(self, proc: Child) -> None:
        with self._lock:
            self._procs.discard(proc)

    def close(self) -> None:
        """Kill every running child (and its process group) and refuse new ones."""
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        for proc in procs:
            proc.kill()


def _start_child(
    spec_file: Path, out_file: Path, log: Path, env: Mapping[str, str], python: str, server: ForkServer | None
) -> Child:
    if server is not None:
        forked = server.spawn(WORKER, [str(spec_file), str(out_file)], log, env)
        if forked is not None:
            return forked
    log_fd = open_log(log)  # never through a symlink left at the log's name
    try:
        proc = start(
            [python, "-m", "petlbench.run.worker", str(spec_file), str(out_file)],
            {**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log_fd,
            stderr=subprocess.STDOUT,
        )
    finally:
        os.close(log_fd)
    return SpawnedChild(proc)


def run_in_subprocess(
    spec: RunSpec,
    results_dir: Path,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    children: Children | None = None,
    servers: ForkServers | None = None,
) -> RunResult:
    """Run one spec in a fresh worker process; always returns exactly one result.

    The worker is forked from a fork server of `servers` when given (and working), else a fresh interpreter.
    `children`, when given, holds the process while it runs, so another thread can kill it on an interrupt.
    """
    log = log_folder(results_dir, spec) / log_path(results_dir, spec).name
    tmp = temp_dir(TEMP_PREFIX)
    lease = servers.lease() if servers is not None else contextlib.nullcontext(None)
    try:
        with lease as server:  # the server is this run's until its worker ends
            return _run_child(spec, results_dir, log, tmp, env, python, children, server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_child(
    spec: RunSpec,
    results_dir: Path,
    log: Path,
    tmp: Path,
    env: Mapping[str, str] | None,
    python: str,
    children: Children | None,
    server: ForkServer | None,
) -> RunResult:
    spec_file, out_file = tmp / "spec.json", tmp / "result.json"
    spec_file.write_text(spec.model_dump_json())
    oom_before = oom_kills()
    start_time = time.monotonic()
    in_flight = 1 + (children.running() if children is not None else 0)
    env = {**(env or {}), RUNS_IN_FLIGHT_ENV: str(in_flight)}
    proc = _start_child(spec_file, out_file, log, env, python, server)
    if children is not None:
        children.add(proc)
    try:
        code = proc.wait(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=REAP_TIMEOUT_S)  # reap it (a fork server that cannot report it is declared dead)
        return failed_result(
            spec,
            "timeout",
            f"run exceeded its timeout of {spec.timeout_s:g} s and was killed; raise timeout_s in the suite"
            f"\n{log_tail(log)}",
            duration_s=time.monotonic() - start_time,
        )
    except BaseException:
        proc.kill()
        raise
    finally:
        if children is not None:
            children.discard(proc)
    kill_pgid(proc.pid)  # what the worker left running (DataLoader workers after its os._exit)
    duration = time.monotonic() - start_time
    if out_file.exists():
        try:
            result = RunResult.model_validate_json(out_file.read_text())
        except (ValidationError, OSError) as exc:
            return failed_result(spec, "error", f"worker wrote an unreadable result: {exc}", duration)
        return keep_snapshot(result, results_dir)
    if killed_by_oom_killer(code, oom_before, oom_kills()):
        return failed_result(
            spec,
            "oom",
            f"the kernel's OOM killer stopped the worker (out of host memory at batch size {spec.batch_size})"
            f"\n{log_tail(log)}",
            duration,
        )
    return failed_result(
        spec, "error", f"worker {describe_exit(code)} without writing a result\n{log_tail(log)}", duration
    )


def run_on_node(spec_json: str, env: dict[str, str]) -> tuple[str, str]:
    """A run on another machine (a Ray task, a SLURM job): the worker in a subprocess, logging to a temp folder.

    Returns the RunResult as JSON and the end of the worker log (at most LOG_LIMIT bytes), for the driver to
    store. An interrupt (a cancelled task) kills the worker, as `run_in_subprocess` does.
    """
    spec = RunSpec.model_validate_json(spec_json)
    with tempfile.TemporaryDirectory(prefix="petlbench-node-") as tmp:
        result = run_in_subprocess(spec, Path(tmp), env)
        try:
            with log_path(Path(tmp), spec).open("rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - LOG_LIMIT))
                log = file.read().decode(errors="replace")
        except OSError:
            log = ""
    return result.model_dump_json(), log


class LocalExecutor:
    """Runs specs `jobs` at a time, each in its own subprocess; CUDA runs each on a GPU of their own.

    Args:
        results_dir: where the worker logs go (`results/<suite>/logs/`); the caller writes the results.
        env: extra environment for every worker.
        jobs: runs at once. For CUDA runs, at most one per GPU in `gpus` whatever `jobs` says.
        gpus: the GPUs CUDA runs may use (CUDA_VISIBLE_DEVICES entries); a CUDA run with none becomes an error row.
    """

    def __init__(
        self,
        results_dir: Path,
        env: Mapping[str, str] | None = None,
        jobs: int = 1,
        gpus: Sequence[str] = (),
        servers: ForkServers | None = None,
    ) -> None:
        if jobs < 1:
            raise ConfigError(f"--jobs: must be ≥ 1, got {jobs}")
        self.results_dir = results_dir
        self.env = dict(env or {})
        self.jobs = jobs
        self.gpus = list(gpus)
        self.servers = servers  # the sweep's fork servers (it closes them); None: this executor starts its own

    def __str__(self) -> str:
        return "local" + (f", {self.jobs} runs at a time" if self.jobs > 1 else "")

    def _child_env(self, device: str | None) -> dict[str, str]:
        env = dict(self.env)
        if self.jobs > 1:
            env.update(thread_env(threads_per_run(self.jobs)))
        if device is not None:
            env.update(gpu_env(device))
        return env

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        if not specs:
            return
        clean_stale_temp(TEMP_PREFIX)  # folders of a parent that was killed with -9
        events: queue.Queue[RunEvent] = queue.Queue()
        children = Children()
        gpus = DevicePool(self.gpus) if self.gpus else None
        env = {**os.environ, **self.env}
        own = self.servers is None and fork_server_enabled(env)
        servers = ForkServers(env) if own else self.servers

        def run(spec: RunSpec) -> None:
            if children.closed:  # interrupted before this run started
                return
            if spec.device == "cuda" and gpus is None:
                events.put(RunStarted(spec))
                events.put(RunFinished(failed_result(spec, "error", "device cuda: the executor was given no GPU")))
                return
            try:
                with gpus.lease() if spec.device == "cuda" and gpus else contextlib.nullcontext() as device:
                    if children.closed:
                        return
                    events.put(RunStarted(spec))
                    result = run_in_subprocess(
                        spec, self.results_dir, self._child_env(device), children=children, servers=servers
                    )
            except Exception as exc:  # a bug here must not hang the sweep: the run still gets its row
                result = failed_result(spec, "error", f"local executor failed: {type(exc).__name__}: {exc}")
            events.put(RunFinished(result))

        pool = ThreadPoolExecutor(max_workers=min(self.jobs, len(specs)), thread_name_prefix="petlbench-run")
        try:
            for spec in specs:
                pool.submit(run, spec)
            finished = 0
            while finished < len(specs):
                event = events.get()
                finished += isinstance(event, RunFinished)
                yield event
        finally:  # done, interrupted (KeyboardInterrupt), or the caller stopped listening (GeneratorExit)
            children.close()
            if own and servers is not None:  # before waiting for the run threads: one may wait on a server's imports
                servers.close()
            pool.shutdown(wait=True, cancel_futures=True)
