"""The fork server: import torch, timm and the worker once, then fork one fresh worker per run.

    python -m petlbench.run.forkserver      (started by petlbench.executors.forkclient, one per run slot)

Protocol (JSON lines): the server says `{"ready": true}` once imported; then for each request
`{"target", "args", "log", "env"}` on stdin it forks a child, says `{"pid": N}`, waits for it and says
`{"exit": CODE}` (negative: killed by that signal). One child at a time. Targets: `worker` (args: spec file, result
file: one run) and `probe` (args: request file, answer file: the pre-flight's configuration probe).

What keeps the isolation of a fresh interpreter (docs/scaling.md): the server never runs a torch op, never touches
CUDA and starts no thread pool, so every child starts from the same pristine post-import state, initialises CUDA
itself (its own context and caching allocator) and applies its own thread budget. The child leads its own session,
writes to its run's log, dies with the server (parent-death signal), and ends with `os._exit` after its result.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from petlbench.executors.process import WORKER_NAME, die_with_parent, set_process_name
from petlbench.system.safeio import open_log


def _send(fd: int, message: dict[str, Any]) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")


def _child(request: dict[str, Any], server_pid: int, started: float) -> NoReturn:
    """In the forked child: become the run's worker, then exit without interpreter teardown."""
    code = 1
    try:
        os.setsid()  # its own session: the parent kills the run and everything it starts as one group
        log = open_log(Path(request["log"]))  # never through a symlink left at the log's name
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        die_with_parent(server_pid)
        set_process_name(WORKER_NAME)
        env: dict[str, str] = request["env"]
        os.environ.update(env)
        import torch

        threads = env.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():  # libgomp read OMP_NUM_THREADS when the server loaded it
            torch.set_num_threads(int(threads))
        print(f"forked from the fork server (imports done {time.time() - started:.2f} s ago)", file=sys.stderr)
        code = _run_target(request["target"], [Path(a) for a in request["args"]])
    except BaseException:
        traceback.print_exc()
    worker_flush_and_exit(code)


def _run_target(target: str, args: list[Path]) -> int:
    if target == "worker":
        from petlbench.run import worker

        return worker.run_files(args[0], args[1])
    if target == "probe":
        from petlbench.run import probe

        args[1].write_text(probe.answer(args[0].read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    raise ValueError(f"unknown fork server target {target!r}")


def worker_flush_and_exit(code: int) -> NoReturn:
    from petlbench.run.worker import flush_and_exit

    flush_and_exit(code)


def native_threads() -> int:
    """Threads of this process, native ones included (OpenMP, BLAS pools); Python's count misses those."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def main() -> int:
    die_with_parent()
    protocol = os.dup(1)  # replies go to the pipe; anything an import prints goes to the server log instead
    os.dup2(2, 1)
    t0 = time.perf_counter()
    # numpy's OpenBLAS starts its thread pool on import; a thread at fork time is copied mid-state into every child,
    # so the server imports it single-threaded (and leaves the variable as it found it for the children).
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import timm  # noqa: F401  (every backbone comes from timm: import it here, once)

    from petlbench.run import probe, worker  # noqa: F401  (torch, the measuring code and the model builder)

    if blas is None:
        del os.environ["OPENBLAS_NUM_THREADS"]
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = blas
    threads = native_threads()
    if threads != 1:
        print(f"fork server: {threads} threads after imports; refusing to fork", file=sys.stderr)
        return 1
    print(f"fork server ready: imports {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    started = time.time()
    _send(protocol, {"ready": True})
    server_pid = os.getpid()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(protocol)
            _child(request, server_pid, started)
        _send(protocol, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(protocol, {"exit": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
