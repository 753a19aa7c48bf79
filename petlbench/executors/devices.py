"""Who runs where: the GPU pool (one measured run per GPU, never two) and the per-child CPU thread budget.

Pure and torch-free, so it is unit-tested with fake device lists ('0', '1', GPU UUIDs) on machines without a GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from petlbench.errors import ConfigError, DeviceError
from petlbench.spec.models import Device


class DevicePool:
    """Lends devices to concurrent runs: each device to at most one run at a time, always the lowest free one.

    Devices are the strings CUDA_VISIBLE_DEVICES accepts ('0', 'GPU-8f3c…', 'MIG-…'); a child given one of them
    sees exactly that GPU as cuda:0. Thread-safe; `lease()` returns the device however the run ends.
    """

    def __init__(self, devices: Sequence[str]) -> None:
        if not devices:
            raise ValueError("a device pool needs at least one device")
        repeated = sorted({d for d in devices if list(devices).count(d) > 1})
        if repeated:
            raise ValueError(f"device listed twice: {', '.join(repeated)} (a GPU must never run two runs at once)")
        self._order = {device: i for i, device in enumerate(devices)}
        self._free = list(devices)
        self._ready = threading.Condition()

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self._order)

    @property
    def free(self) -> tuple[str, ...]:
        with self._ready:
            return tuple(self._free)

    @property
    def busy(self) -> tuple[str, ...]:
        with self._ready:
            return tuple(d for d in self._order if d not in self._free)

    def try_acquire(self) -> str | None:
        """The lowest free device, now marked busy; None when every device is busy."""
        with self._ready:
            return self._free.pop(0) if self._free else None

    def acquire(self) -> str:
        """The lowest free device, waiting until one is returned."""
        with self._ready:
            self._ready.wait_for(lambda: bool(self._free))
            return self._free.pop(0)

    def release(self, device: str) -> None:
        with self._ready:
            if device not in self._order:
                raise ValueError(f"device {device!r} is not in this pool ({', '.join(self._order)})")
            if device in self._free:
                raise ValueError(f"device {device!r} was returned twice")
            self._free.append(device)
            self._free.sort(key=self._order.__getitem__)
            self._ready.notify()

    @contextmanager
    def lease(self) -> Iterator[str]:
        """`with pool.lease() as device:` — the device is returned on success, failure, timeout or interrupt."""
        device = self.acquire()
        try:
            yield device
        finally:
            self.release(device)


def gpu_env(device: str) -> dict[str, str]:
    """Environment that makes a child see exactly `device` (as cuda:0)."""
    return {"CUDA_VISIBLE_DEVICES": device}


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_run(jobs: int, cores: int | None = None) -> int:
    """Each of `jobs` concurrent children gets an equal share of the cores (at least one thread)."""
    return max(1, (cores if cores is not None else available_cores()) // max(1, jobs))


def thread_env(threads: int) -> dict[str, str]:
    """Thread budget for a worker: torch reads OMP_NUM_THREADS at start-up (recorded as env.torch_threads)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cap_jobs(option: str, jobs: int | None, what: str = "runs", cores: int | None = None) -> tuple[int | None, str]:
    """Processes on this machine: at most one per core this process may use (more would share the cores, each
    with a thread budget of 1, and oversubscribe them). Returns the value to use, and the line that says it was
    capped ('' when it was not)."""
    cores = cores if cores is not None else available_cores()
    if jobs is None or jobs <= cores:
        return jobs, ""
    return cores, f"{option} {jobs}: this machine runs {cores} {what} at once (one per CPU core); using {cores}"


def resolve_jobs(device: Device, jobs: int | None, gpus: Sequence[str]) -> int:
    """How many runs the local executor runs at once.

    CPU: `jobs`, default 1. CUDA: one run per visible GPU by default; more jobs than GPUs is refused, because two
    measured runs on one GPU would disturb each other's memory and speed.
    """
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs: must be ≥ 1, got {jobs}")
    if device == "cpu":
        return jobs or 1
    if not gpus:
        raise ConfigError("--jobs: device cuda but no GPU is visible; use --device cpu")
    if jobs is None:
        return len(gpus)
    if jobs > len(gpus):
        raise ConfigError(
            f"--jobs: {jobs} parallel CUDA runs but only {len(gpus)} GPU(s) visible ({', '.join(gpus)}); a GPU never "
            f"runs two measured runs at once, so use --jobs 1..{len(gpus)}"
        )
    return jobs


def resolve_device(requested: str, gpus: Sequence[str]) -> Device:
    """'auto' → cuda when a GPU is visible, else cpu; 'cuda' without a GPU is a DeviceError."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not gpus:
            raise DeviceError(
                "device cuda: no NVIDIA GPU is visible (NVML found none, or CUDA_VISIBLE_DEVICES hides them); "
                "use --device cpu"
            )
        return "cuda"
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    raise DeviceError(f"device {requested!r}: expected auto, cpu or cuda")
