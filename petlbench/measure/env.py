"""The environment block stored on every row: versions, device, and the controlled variables."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from petlbench.measure.nvml import driver_version
from petlbench.results import EnvValue


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cache
def git_state() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the petlbench source tree, or (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha or None, bool(status.strip())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env(device: torch.device) -> dict[str, EnvValue]:
    """Versions, hardware and the settings that change memory or speed."""
    sha, dirty = git_state()
    env: dict[str, EnvValue] = {
        "petlbench": _version("petlbench"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "cuda": torch.version.cuda,
        "git_sha": sha,
        "git_dirty": dirty,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=props.name,
            gpu_memory_bytes=int(props.total_memory),
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=str(torch.backends.cudnn.version()),
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
            sdpa_flash=bool(torch.backends.cuda.flash_sdp_enabled()),
            sdpa_mem_efficient=bool(torch.backends.cuda.mem_efficient_sdp_enabled()),
            sdpa_math=bool(torch.backends.cuda.math_sdp_enabled()),
            driver=driver_version(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return env
