"""Executors: how RunSpecs become RunResults. One small protocol, one file per executor.

- `local.py`: a subprocess per run on this machine, `jobs` at a time (one run per GPU for CUDA runs);
- `ray.py` (extra `petlbench[ray]`): a Ray task per run on a cluster, each still a subprocess.

Another engine (SLURM through submitit, say) is one more file with a class that has `execute` — submit each spec,
yield a RunStarted when submitted and a RunFinished per result, kill what is outstanding when interrupted — and one
more branch in `make_executor`. Executors never write results: `sweep.execute` does, on the driver, as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeAlias

from petlbench.errors import ConfigError
from petlbench.results import RunResult
from petlbench.suite import Device, RunSpec


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


ExecutorKind: TypeAlias = Literal["local", "ray"]


def make_executor(
    kind: ExecutorKind,
    results_dir: Path,
    device: Device,
    jobs: int | None = None,
    address: str | None = None,
    gpus: Sequence[str] | None = None,
) -> Executor:
    """The executor the `run` command asked for; option errors are one-line ConfigErrors, raised before any run.

    local: `jobs` runs at once (CPU: default 1; CUDA: default and maximum one per visible GPU).
    ray: every run a Ray task; `jobs` caps the runs in flight (default: Ray's resources decide).
    """
    if kind == "local":
        if address is not None:
            raise ConfigError("--address: only used with --executor ray")
        from petlbench.executors.devices import resolve_jobs
        from petlbench.executors.local import LocalExecutor
        from petlbench.gpus import visible_gpus

        gpus = visible_gpus() if gpus is None else list(gpus)
        return LocalExecutor(results_dir, jobs=resolve_jobs(device, jobs, gpus), gpus=gpus if device == "cuda" else ())
    if kind == "ray":
        from petlbench.executors.ray import RayExecutor

        return RayExecutor(results_dir, address=address, max_in_flight=jobs)
    raise ConfigError(f"--executor: unknown executor {kind!r}; valid: local, ray")
