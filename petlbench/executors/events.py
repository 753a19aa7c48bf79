"""What every executor yields (`RunStarted`, `RunFinished`) and the one method it has (`Executor.execute`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from petlbench.results import RunResult
from petlbench.spec.models import RunSpec


@dataclass(frozen=True)
class RunStarted:
    spec: RunSpec


@dataclass(frozen=True)
class RunFinished:
    result: RunResult


RunEvent: TypeAlias = RunStarted | RunFinished


class Executor(Protocol):
    """Runs specs, yielding a RunStarted and exactly one RunFinished per spec (in any order across specs).

    RunStarted means started, or submitted where the engine queues runs itself (Ray). A failure of one run is a
    RunFinished with status oom/error/timeout, never an exception, and never stops the other runs. A
    KeyboardInterrupt, or the caller closing the iterator, must stop every run the executor started before it
    propagates; a run stopped that way yields no RunFinished (so it is not stored, and a rerun does it).
    """

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]: ...
