"""Executors: how RunSpecs become RunResults. One small protocol; the local one runs a subprocess per run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from petlbench.results import RunResult
from petlbench.suite import RunSpec


@dataclass(frozen=True)
class RunStarted:
    spec: RunSpec


@dataclass(frozen=True)
class RunFinished:
    result: RunResult


RunEvent: TypeAlias = RunStarted | RunFinished


class Executor(Protocol):
    """Runs specs, yielding a RunStarted and exactly one RunFinished per spec (in any order across specs).

    A failure of one run is a RunFinished with status oom/error/timeout, never an exception. KeyboardInterrupt
    must stop every child the executor started before it propagates.
    """

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]: ...
