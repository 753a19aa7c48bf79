"""Local executor: one `python -m petlbench.worker` subprocess per run, with a wall-clock timeout.

A fresh interpreter per run means a fresh CUDA context and caching allocator, so one run's fragmentation or
OOM never leaks into the next. The child's stdout/stderr go to `results/<suite>/logs/<run_id>.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from petlbench.executors import RunEvent, RunFinished, RunStarted
from petlbench.results import RunResult, failed_result, suite_dir
from petlbench.suite import RunSpec

TAIL_LINES = 20
TAIL_CHARS = 2000


def log_path(results_dir: Path, spec: RunSpec) -> Path:
    return suite_dir(results_dir, spec.suite) / "logs" / f"{spec.run_id}.log"


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


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the worker and anything it started (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_in_subprocess(
    spec: RunSpec,
    results_dir: Path,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> RunResult:
    """Run one spec in a fresh worker process; always returns exactly one result."""
    log = log_path(results_dir, spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="petlbench-run-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(spec.model_dump_json())
        start = time.monotonic()
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [python, "-m", "petlbench.worker", str(spec_file), str(out_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,  # Ctrl-C reaches only the parent, which then stops the child cleanly
            )
            try:
                code = proc.wait(timeout=spec.timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                return failed_result(
                    spec,
                    "timeout",
                    f"run exceeded its timeout of {spec.timeout_s:g} s and was killed; raise timeout_s in the suite"
                    f"\n{log_tail(log)}",
                    duration_s=time.monotonic() - start,
                )
            except BaseException:
                _kill(proc)
                raise
        duration = time.monotonic() - start
        if out_file.exists():
            try:
                return RunResult.model_validate_json(out_file.read_text())
            except (ValidationError, OSError) as exc:
                return failed_result(spec, "error", f"worker wrote an unreadable result: {exc}", duration)
        return failed_result(
            spec, "error", f"worker {describe_exit(code)} without writing a result\n{log_tail(log)}", duration
        )


class LocalExecutor:
    """Runs specs one after another, each in its own subprocess."""

    def __init__(self, results_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.results_dir = results_dir
        self.env = dict(env or {})

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        for spec in specs:
            yield RunStarted(spec)
            yield RunFinished(run_in_subprocess(spec, self.results_dir, self.env))
