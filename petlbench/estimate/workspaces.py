"""Device memory a CUDA training step allocates that a fake-tensor trace never sees (torch-free).

- **cuBLAS workspaces.** PyTorch hands every cuBLAS handle a workspace per (handle, stream), allocated through the
  caching allocator at the handle's first use and never freed (aten/src/ATen/cuda/CublasHandlePool.cpp). Handles
  belong to threads: the forward and the optimizer run on the main thread, CUDA backward on autograd's device
  thread, so a training step holds two workspaces and an inference forward one. The size: `CUBLAS_WORKSPACE_CONFIG`
  (`:SIZE_KiB:COUNT` pairs, summed) if set, else 32 MiB on compute capability 9.x–12.x and 8 MiB + 128 KiB
  (`:4096:2:16:8`) below; read off the pinned torch's `parseChosenWorkspaceSize` (docs/estimation.md says how).
- **cuBLASLt.** With `TORCH_CUBLASLT_UNIFIED_WORKSPACE` unset or true (the pinned torch's default) cuBLASLt uses the
  cuBLAS workspace of the same handle and stream: nothing more. Set false, each handle also gets
  `CUBLASLT_WORKSPACE_SIZE` KiB (default 1024) of its own; this model counts it on every handle that ran a matrix
  product (an upper bound: only Lt calls allocate it).
- **Attention backward scratch.** The fused attention kernels allocate accumulation buffers inside their backward
  and free them on return (`attention_backward_scratch`): FlashAttention-2's `softmax_d` and `dq_accum`
  (flash_attn/flash_api.cpp, `mha_bwd`), memory-efficient attention's `delta` and gradient workspace
  (attention_backward.cu, `_efficient_attention_backward`), cuDNN's graph workspace. Flash's sizes are the
  source's formulas; memory-efficient's workspace and cuDNN's are approximations (marked so on the row).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB
HOPPER_WORKSPACE: Final = 32 * MiB  # 4096 KiB x 8
DEFAULT_WORKSPACE: Final = 2 * 4096 * KiB + 8 * 16 * KiB  # ":4096:2:16:8"
CUBLASLT_DEFAULT_KIB: Final = 1024
_WORKSPACE_PAIR: Final = re.compile(r":([0-9]+):([0-9]+)")

# the backward ops of the fused attention kernels, and which scratch formula each one takes
ATTENTION_BACKWARD_OPS: Final = {
    "_scaled_dot_product_flash_attention_backward": "flash",
    "_flash_attention_backward": "flash",
    "_scaled_dot_product_efficient_attention_backward": "efficient",
    "_efficient_attention_backward": "efficient",
    "_scaled_dot_product_cudnn_attention_backward": "cudnn",
    "_cudnn_attention_backward": "cudnn",
}
APPROXIMATE_SCRATCH: Final = frozenset({"efficient", "cudnn"})


def cublas_workspace_bytes(capability: tuple[int, int], env: Mapping[str, str]) -> int:
    """One cuBLAS handle's workspace on a GPU of this compute capability, under `env`'s CUBLAS_WORKSPACE_CONFIG."""
    default = HOPPER_WORKSPACE if 9 <= capability[0] <= 12 else DEFAULT_WORKSPACE
    config = env.get("CUBLAS_WORKSPACE_CONFIG")
    if not config:
        return default
    pairs = _WORKSPACE_PAIR.findall(config)
    if not pairs:  # torch warns and keeps its default
        return default
    return sum(int(size) * KiB * int(count) for size, count in pairs)


def cublaslt_extra_bytes(capability: tuple[int, int], env: Mapping[str, str]) -> int:
    """What cuBLASLt allocates per handle beyond the cuBLAS workspace: 0 when the two are unified (the default)."""
    unified = env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    if unified is None or unified.strip().lower() in ("1", "true", "on", "yes", "y"):
        return 0
    text = env.get("CUBLASLT_WORKSPACE_SIZE", "")
    try:
        kib = int(text) if text else CUBLASLT_DEFAULT_KIB
    except ValueError:
        kib = CUBLASLT_DEFAULT_KIB  # torch warns and keeps its default
    return kib * KiB


def _round(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def attention_backward_scratch(kernel: str, shape: tuple[int, ...]) -> list[int]:
    """Transient allocations (bytes, in allocation order; all freed when the op returns) of one fused attention
    backward whose gradient of the query has `shape` = (batch, heads, tokens, head_dim). [] when unknown."""
    if len(shape) != 4:
        return []
    b, h, n, d = shape
    if kernel == "flash":
        head = _round(_round(d, 8), 32 if _round(d, 8) <= 128 else 64)
        rows = _round(n, 128)
        return [b * h * rows * 4, b * rows * h * head * 4]  # softmax_d, dq_accum (fp32)
    if kernel == "efficient":
        return [b * h * n * 4, b * h * _round(n, 64) * _round(d, 64) * 4]  # delta, gradient accumulation (fp32)
    if kernel == "cudnn":
        return [b * h * n * d * 4 + b * h * n * 4]  # the graph's workspace: dQ accumulation and softmax sums (fp32)
    return []
