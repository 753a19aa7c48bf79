"""Running specs with an executor while every finished result is stored at once (the sweep and the auto-batch
search both run this way)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from petlbench.executors import Executor, RunFinished
from petlbench.executors.events import RunEvent
from petlbench.results import RunResult, results_lock, suite_dir, write_result
from petlbench.spec.models import RunSpec


def execute(
    specs: Sequence[RunSpec], executor: Executor, results_dir: Path, memory_limit: int | None = None
) -> Iterator[RunEvent]:
    """Run `specs`; each result is stored before its event is yielded, so an interruption loses nothing finished.

    `memory_limit` (auto-batch probes) is recorded on every row as the limit it was judged against. A result that
    cannot be stored (disk full, read-only) raises WriteError after the executor has stopped every running worker:
    the rows stored before stay, nothing more runs.
    """
    events = executor.execute(specs)
    try:
        for event in events:
            if isinstance(event, RunFinished):
                if memory_limit is not None:
                    event.result.metrics.memory_limit_bytes = memory_limit
                write_result(results_dir, event.result)
            yield event
    finally:  # a write error, an interrupt, or the caller stopped: the executor kills what still runs
        close = getattr(events, "close", None)
        if callable(close):
            close()


def hold(results_dir: Path, suite: str) -> AbstractContextManager[None]:
    """For the whole sweep: the suite's results folder is writable (checked now) and locked against a second run."""
    return results_lock(suite_dir(results_dir, suite))


def record(results_dir: Path, results: Iterable[RunResult]) -> None:
    """Store rows no executor produced (runs `--skip-predicted-oom` did not start)."""
    for result in results:
        write_result(results_dir, result)
