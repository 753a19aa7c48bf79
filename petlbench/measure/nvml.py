"""Torch-free GPU discovery for the parent process (NVML + CUDA_VISIBLE_DEVICES).

The parent never imports torch, so it cannot ask `torch.cuda`; NVML answers the same question without creating
a CUDA context.
"""

from __future__ import annotations

import os


def visible_gpus() -> list[str]:
    """Identifiers of the GPUs this process may use, in CUDA order ('0', '1', or UUIDs from CUDA_VISIBLE_DEVICES).

    Empty when there is no NVIDIA driver, no device, or CUDA_VISIBLE_DEVICES hides them all.
    """
    count = _nvml_device_count()
    if count == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in env.split(",")]
    visible: list[str] = []
    for entry in entries:
        # CUDA stops at the first invalid entry; so do we.
        if (entry.isdigit() and int(entry) < count) or entry.startswith(("GPU-", "MIG-")):
            visible.append(entry)
        else:
            break
    return visible


def _nvml_device_count() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / library: the NVML error classes are generated at runtime
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_bytes(gpu: str = "0") -> int | None:
    """Total memory of one GPU by its CUDA_VISIBLE_DEVICES-style identifier ('0', 'GPU-…'), from NVML; None if unknown.

    Used as the default memory limit of CUDA runs (estimate FITS/OOM, `run --skip-predicted-oom`, `batch_size:
    auto`); the parent never imports torch, and NVML needs no CUDA context.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        if gpu.startswith(("GPU-", "MIG-")):
            handle = pynvml.nvmlDeviceGetHandleByUUID(gpu)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
