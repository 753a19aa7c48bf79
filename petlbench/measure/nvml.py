"""NVML, the driver's view of the GPUs, torch-free: discovery for the parent, the driver version, and a sampler.

The parent never imports torch, so it cannot ask `torch.cuda`; NVML answers the same questions without creating
a CUDA context. Every use goes through `nvml()`, one init/shutdown pair that yields None (and logs why once) when
there is no NVIDIA driver or library.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType, TracebackType
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def nvml() -> Iterator[ModuleType | None]:
    """`with nvml() as lib:` — pynvml initialised (None without a driver), shut down after the block."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver: the NVML error classes are generated at runtime
        log.debug("NVML unavailable: %s", exc)
        yield None
        return
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.warning("NVML shutdown failed: %s", exc)


def _device_count() -> int:
    with nvml() as lib:
        if lib is None:
            return 0
        try:
            return int(lib.nvmlDeviceGetCount())
        except Exception as exc:
            log.warning("NVML could not count devices: %s", exc)
            return 0


def visible_gpus() -> list[str]:
    """Identifiers of the GPUs this process may use, in CUDA order ('0', '1', or UUIDs from CUDA_VISIBLE_DEVICES).

    Empty when there is no NVIDIA driver, no device, or CUDA_VISIBLE_DEVICES hides them all.
    """
    count = _device_count()
    if count == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    visible: list[str] = []
    for entry in (e.strip() for e in env.split(",")):
        # CUDA stops at the first invalid entry; so do we.
        if (entry.isdigit() and int(entry) < count) or entry.startswith(("GPU-", "MIG-")):
            visible.append(entry)
        else:
            break
    return visible


def gpu_memory_bytes(gpu: str = "0") -> int | None:
    """Total memory of one GPU by its CUDA_VISIBLE_DEVICES-style identifier ('0', 'GPU-…'); None if unknown.

    The default memory limit of CUDA runs (estimate FITS/OOM, `run --skip-predicted-oom`, `batch_size: auto`).
    """
    with nvml() as lib:
        if lib is None:
            return None
        try:
            if gpu.startswith(("GPU-", "MIG-")):
                handle = lib.nvmlDeviceGetHandleByUUID(gpu)
            else:
                handle = lib.nvmlDeviceGetHandleByIndex(int(gpu))
            return int(lib.nvmlDeviceGetMemoryInfo(handle).total)
        except Exception as exc:
            log.warning("NVML could not read the memory of GPU %s: %s", gpu, exc)
            return None


def driver_version() -> str | None:
    with nvml() as lib:
        if lib is None:
            return None
        try:
            version = lib.nvmlSystemGetDriverVersion()
        except Exception as exc:
            log.warning("NVML could not read the driver version: %s", exc)
            return None
    return version.decode() if isinstance(version, bytes) else str(version)


class NvmlSampler:
    """Samples this process's GPU memory in a background thread (driver view, CUDA context included).

    `handle_of(lib)` gives the NVML handle of the device to watch (the caller maps torch's device to it). When the
    driver does not list our PID (containers with their own PID namespace), it falls back to the whole device's
    used memory and says so in `scope`. A failed sample is logged (once) and skipped, never invented.
    """

    def __init__(self, handle_of: Any, interval_s: float) -> None:
        self.handle_of = handle_of
        self.interval_s = interval_s
        self.peak: int | None = None
        self.scope: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lib: ModuleType | None = None
        self._handle: object | None = None
        self._session: Any = None
        self._warned = False

    def __enter__(self) -> NvmlSampler:
        self._session = nvml()
        self._lib = self._session.__enter__()
        if self._lib is None:
            log.warning("NVML unavailable; peak_driver_bytes will be empty")
            return self
        try:
            self._handle = self.handle_of(self._lib)
        except Exception as exc:
            log.warning("NVML has no handle for this device (%s); peak_driver_bytes will be empty", exc)
            return self
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        lib = self._lib
        assert lib is not None
        used: int | None = None
        scope = "process"
        try:
            pid = os.getpid()
            for proc in lib.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    used = int(proc.usedGpuMemory)
            if used is None:
                used, scope = int(lib.nvmlDeviceGetMemoryInfo(self._handle).used), "device"
        except Exception as exc:
            if not self._warned:
                log.warning("NVML sample failed (%s); later failures are not logged", exc)
                self._warned = True
            return
        if self.peak is None or used > self.peak:
            self.peak = used
        # once any sample had to fall back, the whole peak is a device-level number
        self.scope = "device" if "device" in (scope, self.scope) else scope

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        if self._session is not None:
            self._session.__exit__(exc_type, exc, tb)
