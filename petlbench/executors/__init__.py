"""Executors: how RunSpecs become RunResults. One small protocol, one file per executor.

- `local.py`: a subprocess per run on this machine, `jobs` at a time (one run per GPU for CUDA runs);
- `ray.py` (extra `petlbench[ray]`): a Ray task per run on a cluster, each still a subprocess.

Another engine (SLURM through submitit, say) is one more file with a class that has `execute` — submit each spec,
yield a RunStarted when submitted and a RunFinished per result, kill what is outstanding when interrupted — and one
more branch in `make_executor`. Executors never write results: `sweep.execute` does, on the driver, as they
arrive. The events and the protocol live in `base.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeAlias

from petlbench.errors import ConfigError
from petlbench.executors.events import Executor, RunEvent, RunFinished, RunStarted
from petlbench.executors.forkclient import ForkServers
from petlbench.spec.models import Device

__all__ = ["Executor", "ExecutorKind", "RunEvent", "RunFinished", "RunStarted", "make_executor"]


ExecutorKind: TypeAlias = Literal["local", "ray"]


def make_executor(
    kind: ExecutorKind,
    results_dir: Path,
    device: Device,
    jobs: int | None = None,
    address: str | None = None,
    gpus: Sequence[str] | None = None,
    servers: ForkServers | None = None,
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
        from petlbench.measure.nvml import visible_gpus

        gpus = visible_gpus() if gpus is None else list(gpus)
        jobs = resolve_jobs(device, jobs, gpus)
        return LocalExecutor(results_dir, jobs=jobs, gpus=gpus if device == "cuda" else (), servers=servers)
    if kind == "ray":
        from petlbench.executors.ray import RayExecutor

        return RayExecutor(results_dir, address=address, max_in_flight=jobs)
    raise ConfigError(f"--executor: unknown executor {kind!r}; valid: local, ray")
