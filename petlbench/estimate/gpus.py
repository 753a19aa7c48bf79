"""GPU presets for CUDA estimates (torch-free): what a run on each card can use, and what it assumes of the card.

A preset names the card's compute capability (it decides the cuBLAS workspace and the attention kernel), its
memory as the driver reports it (nvidia-smi's `memory.total`), and the memory a PyTorch process holds there outside
the caching allocator (the driver's reservation, the CUDA context, library handles and loaded kernels: `context`).
The figures and their sources are in docs/estimation.md; every context figure is an estimate until the GPU kit
(scripts/gpu_probe.py) measures it on that card.

A run FITS a card when its predicted `max_memory_reserved` + context + headroom ≤ the card's memory. The estimator
replays the run with the allocator limited to memory − context − headroom, so a run that needs the allocator to
release its cache first (as PyTorch does before it reports out-of-memory) still fits, and one that cannot is OOM.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import Field

from petlbench.errors import ConfigError
from petlbench.estimate.attention import CudaTarget, DType, select_kernel
from petlbench.fmt import fmt_bytes, parse_bytes
from petlbench.spec.base import StrictModel

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB
DEFAULT_HEADROOM: Final = "2%"
CUSTOM: Final = "custom"


@dataclass(frozen=True)
class GpuPreset:
    key: str
    name: str
    capability: tuple[int, int]
    memory_mib: int  # nvidia-smi memory.total
    context_mib: int  # estimate: memory outside the caching allocator during training

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB

    @property
    def context_bytes(self) -> int:
        return self.context_mib * MiB


PRESETS: Final[dict[str, GpuPreset]] = {
    p.key: p
    for p in (
        GpuPreset("h100-80gb", "NVIDIA H100 80GB HBM3 (SXM)", (9, 0), 81559, 1024),
        GpuPreset("h100-pcie", "NVIDIA H100 PCIe 80GB", (9, 0), 81559, 1024),
        GpuPreset("h200", "NVIDIA H200 141GB", (9, 0), 143771, 1024),
        GpuPreset("a100-40gb", "NVIDIA A100 40GB", (8, 0), 40960, 1024),
        GpuPreset("a100-80gb", "NVIDIA A100 80GB", (8, 0), 81920, 1024),
        GpuPreset("l40s", "NVIDIA L40S", (8, 9), 46068, 1024),
        GpuPreset("a10g", "NVIDIA A10G", (8, 6), 23028, 896),
        GpuPreset("l4", "NVIDIA L4", (8, 9), 23034, 896),
        GpuPreset("rtx-4090", "NVIDIA GeForce RTX 4090", (8, 9), 24564, 896),
        GpuPreset("rtx-3090", "NVIDIA GeForce RTX 3090", (8, 6), 24576, 896),
        GpuPreset("t4", "NVIDIA T4", (7, 5), 15360, 768),
        GpuPreset("v100-16gb", "NVIDIA V100 16GB", (7, 0), 16160, 768),
        GpuPreset("v100-32gb", "NVIDIA V100 32GB", (7, 0), 32510, 768),
    )
}
DEFAULT_PRESET: Final = "h100-80gb"  # what a CUDA estimate assumes when no GPU is named (the GPU kit's card)
CUSTOM_CAPABILITY: Final = (8, 0)  # a card given only by its memory (--device-memory) is assumed Ampere-class
CUSTOM_CONTEXT_MIB: Final = 1024

_ALIASES: Final = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "a100": "a100-80gb", "4090": "rtx-4090"}


class Target(StrictModel):
    """The device an estimate assumes and is judged on (sent to the estimator process, recorded on the row): a
    GPU preset, or a card given by its memory (`custom`; for CPU runs, just a memory size to fit)."""

    gpu: str  # preset key, or "custom" for a card given by its memory
    name: str
    capability: tuple[int, int]
    memory_bytes: int | None = None  # None: no card to judge against (no verdict)
    context_bytes: int = 0
    headroom_bytes: int = 0
    alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) as the run would see it
    # CUBLAS_WORKSPACE_CONFIG, CUBLASLT_WORKSPACE_SIZE and TORCH_CUBLASLT_UNIFIED_WORKSPACE, where set
    cublas_env: dict[str, str] = Field(default_factory=dict)

    @property
    def cuda(self) -> CudaTarget:
        """What the CUDA trace needs of the card: its compute capability (the attention kernel)."""
        return CudaTarget(capability=self.capability)

    @property
    def allowance(self) -> int | None:
        """Bytes the caching allocator may reserve: memory − context − headroom (None without a card)."""
        if self.memory_bytes is None:
            return None
        return self.memory_bytes - self.context_bytes - self.headroom_bytes

    @property
    def label(self) -> str:
        """How tables and figures name the card: the preset key, or the memory of a custom one."""
        if self.gpu != CUSTOM or self.memory_bytes is None:
            return self.gpu
        return fmt_bytes(self.memory_bytes).replace(".0 ", " ")


_ENV_KEYS: Final = ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", "TORCH_CUBLASLT_UNIFIED_WORKSPACE")


def device_env(env: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The allocator setting and the cuBLAS variables a run started from this environment would see."""
    env = os.environ if env is None else env
    conf = env.get("PYTORCH_CUDA_ALLOC_CONF") or env.get("PYTORCH_ALLOC_CONF") or ""
    return conf, {k: env[k] for k in _ENV_KEYS if k in env}


def preset(name: str) -> GpuPreset:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; known: {', '.join(PRESETS)} (or give --device-memory)")
    return PRESETS[key]


_NAMES: Final = (  # device-name fragments (lower case, spaces removed) → preset, most specific first
    ("h200", "h200"),
    ("h100pcie", "h100-pcie"),
    ("h100", "h100-80gb"),
    ("a100", "a100-80gb"),  # the 40 GB card is told apart by its memory below
    ("l40s", "l40s"),
    ("a10g", "a10g"),
    ("l4", "l4"),
    ("rtx4090", "rtx-4090"),
    ("rtx3090", "rtx-3090"),
    ("t4", "t4"),
    ("v100", "v100-32gb"),
)


def match_preset(device_name: str, memory_bytes: int) -> GpuPreset | None:
    """The preset of a GPU as torch or NVML names it (`NVIDIA H100 80GB HBM3`), or None."""
    name = device_name.lower().replace(" ", "").replace("-", "")
    for fragment, key in _NAMES:
        if fragment in name:
            if key == "a100-80gb" and memory_bytes < 60 * GiB:
                key = "a100-40gb"
            if key == "v100-32gb" and memory_bytes < 24 * GiB:
                key = "v100-16gb"
            return PRESETS[key]
    return None


def parse_headroom(text: str, memory: int) -> int:
    """`--headroom`: a percentage of the card's memory (`2%`) or a size with a unit (`1GiB`); `0` for none."""
    value = text.strip()
    if value in ("0", "0%"):
        return 0
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*%", value)
    if match:
        percent = float(match.group(1))
        if percent >= 100:
            raise ConfigError(f"--headroom: {text!r} leaves nothing of the card; use e.g. 2%")
        return math.ceil(memory * percent / 100)
    if re.fullmatch(r"[0-9.]+", value):
        raise ConfigError(f"--headroom: {text!r} has no unit; write e.g. 2% or 1GiB")
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise ConfigError(f"--headroom: {exc}") from None


def target_for(
    gpu: GpuPreset | None,
    memory: int | None,
    headroom: str = DEFAULT_HEADROOM,
    env: Mapping[str, str] | None = None,
    judged: bool = True,
) -> Target:
    """The target of a preset (its memory and context), or of a card given by `memory` alone. `judged=False`:
    the card only decides kernels and workspaces, with no memory to judge against (no --gpu, no GPU here)."""
    conf, cublas = device_env(env)
    if gpu is not None:
        total = gpu.memory_bytes
        target = Target(
            gpu=gpu.key,
            name=gpu.name,
            capability=gpu.capability,
            memory_bytes=total if judged else None,
            context_bytes=gpu.context_bytes,
            headroom_bytes=parse_headroom(headroom, total) if judged else 0,
            alloc_conf=conf,
            cublas_env=cublas,
        )
        return target
    if memory is None:
        raise ValueError("a target needs a preset or a memory size")
    return Target(
        gpu=CUSTOM,
        name=f"a GPU with {fmt_bytes(memory)} (assumed compute capability 8.0)",
        capability=CUSTOM_CAPABILITY,
        memory_bytes=memory,
        context_bytes=CUSTOM_CONTEXT_MIB * MiB,
        headroom_bytes=parse_headroom(headroom, memory),
        alloc_conf=conf,
        cublas_env=cublas,
    )


def default_target(env: Mapping[str, str] | None = None) -> Target:
    """The card a CUDA estimate models when none is named: the default preset, with no verdict."""
    return target_for(PRESETS[DEFAULT_PRESET], None, judged=False, env=env)


def required_bytes(reserved: int | None, target: Target) -> int | None:
    """What a run needs of the card: predicted reserved + context + headroom."""
    if reserved is None:
        return None
    return reserved + target.context_bytes + target.headroom_bytes


def attention_kernel(target: Target, dtype: DType, head_dim: int, **kwargs: Any) -> str | None:
    """The fused attention kernel CUDA would pick on this card (petlbench/estimate/attention.py)."""
    kernel = select_kernel(target.capability, dtype, head_dim, **kwargs)
    return None if kernel is None else str(kernel)
