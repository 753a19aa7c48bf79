"""A sweep: which runs still need doing, and executing them while every finished result is written at once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from petlbench.executors import Executor, RunEvent, RunFinished
from petlbench.results import DONE_STATUSES, stored_statuses, suite_dir, write_result
from petlbench.spec.models import RunSpec


@dataclass(frozen=True)
class Plan:
    """The runs of a suite split into those to execute and those already done (status ok or oom)."""

    todo: list[RunSpec]
    done: list[RunSpec]
    retry: list[RunSpec]  # in todo because their stored result is error/timeout/skipped


def plan(runs: Sequence[RunSpec], results_dir: Path, force: bool = False) -> Plan:
    statuses: dict[str, str] = {}
    for suite in sorted({r.suite for r in runs}):
        statuses.update(stored_statuses(suite_dir(results_dir, suite)))
    if force:
        return Plan(todo=list(runs), done=[], retry=[])
    todo = [r for r in runs if statuses.get(r.run_id) not in DONE_STATUSES]
    done = [r for r in runs if statuses.get(r.run_id) in DONE_STATUSES]
    retry = [r for r in todo if r.run_id in statuses]
    return Plan(todo=todo, done=done, retry=retry)


def execute(specs: Sequence[RunSpec], executor: Executor, results_dir: Path) -> Iterator[RunEvent]:
    """Run `specs`; each result is stored before its event is yielded, so an interruption loses nothing finished."""
    for event in executor.execute(specs):
        if isinstance(event, RunFinished):
            write_result(results_dir, event.result)
        yield event
