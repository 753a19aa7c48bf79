"""Which kernel `F.scaled_dot_product_attention` runs on a CUDA GPU, decided without one (torch-free).

A transcription of PyTorch's CUDA selector for the pinned torch (2.14, cu130 wheels with cuDNN 9.24):
`select_sdp_backend` and the `can_use_*` checks in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, and the
priority order of `check_prefer_cudnn_attention`. The selector walks a priority order and returns the first
kernel whose checks pass: cuDNN > flash > memory-efficient > math where cuDNN is preferred (compute capability
9.x or 10.x with cuDNN newer than 9.15, CUDA 13 wheels), flash > memory-efficient > math > cuDNN (the context's
default order) elsewhere. docs/estimation.md ("The attention kernel") lists what each kernel keeps for backward.

The estimator calls `select_kernel` with the shapes of each SDPA call it traces (petlbench/estimate/cuda.py);
GPU presets call it with a ViT's head dimension and the run's dtype to say which kernel a GPU would use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

Kernel: TypeAlias = Literal["cudnn", "flash", "efficient", "math"]
DType: TypeAlias = Literal["fp32", "fp16", "bf16", "fp64"]

# The pinned wheels: torch 2.14.1+cu130 loads cuDNN 9.24 (torch.backends.cudnn.version() == 92400).
PINNED_CUDNN: Final = 92400
PINNED_CUDA: Final = (13, 0)
# Targets without a GPU preset: an H100 (compute capability 9.0).
DEFAULT_CAPABILITY: Final = (9, 0)

_MAX_CUDNN_DIM: Final = 65535


@dataclass(frozen=True)
class CudaTarget:
    """The GPU and libraries a CUDA estimate assumes (what the attention selector depends on)."""

    capability: tuple[int, int] = DEFAULT_CAPABILITY
    cudnn_version: int = PINNED_CUDNN
    cuda_version: tuple[int, int] = PINNED_CUDA
    # cuDNN frontend >= 1.24 at build time (head dim up to 256 on sm90/sm10x); only matters for head dim > 128
    cudnn_frontend_d256: bool = True
    # TORCH_CUDNN_SDPA_DEPRIORITIZED=1, torch.use_deterministic_algorithms(True) (not warn-only)
    cudnn_deprioritized: bool = False
    deterministic: bool = False

    @property
    def name(self) -> str:
        """`sm90` for capability (9, 0)."""
        return f"sm{self.capability[0]}{self.capability[1]}"


DEFAULT_TARGET: Final = CudaTarget()


@dataclass(frozen=True)
class SdpaCall:
    """The properties of one SDPA call that the selector reads (dense 4-D inputs, shapes (B, H, N, d)).

    Defaults describe a ViT's self-attention in training: q, k and v are views of one qkv projection, contiguous
    in their last dimension, with storage offsets that are multiples of the head width.
    """

    dtype: DType
    head_dim: int
    value_head_dim: int | None = None  # None: head_dim
    batch: int = 1
    heads: int = 1
    key_heads: int | None = None  # None: heads (no grouped-query attention)
    seq_len_q: int = 197
    seq_len_k: int | None = None  # None: seq_len_q
    dims: int = 4
    dropout_p: float = 0.0
    has_mask: bool = False
    is_causal: bool = False
    requires_grad: bool = True  # grad mode on and q, k or v requires grad
    last_dim_contiguous: bool = True  # stride(-1) == 1 for q, k and v
    # storage offsets of q, k, v in elements (memory-efficient attention checks their byte alignment on sm80+)
    storage_offsets: tuple[int, int, int] = (0, 0, 0)


def select_kernel(
    capability: tuple[int, int],
    dtype: DType,
    head_dim: int,
    *,
    dropout_p: float = 0.0,
    seq_len: int = 197,
    requires_grad: bool = True,
    cudnn_version: int = PINNED_CUDNN,
    cuda_version: tuple[int, int] = PINNED_CUDA,
) -> Kernel:
    """The kernel fused SDPA runs for a ViT self-attention of this head dim on a GPU of this compute capability.

    `select_kernel((9, 0), "bf16", 64)` is "cudnn" (H100, cuDNN 9.24); `select_kernel((8, 0), "bf16", 64)` is
    "flash" (A100); fp32 goes to "efficient" on both. For the full set of inputs use `select`.
    """
    target = CudaTarget(capability=capability, cudnn_version=cudnn_version, cuda_version=cuda_version)
    call = SdpaCall(dtype=dtype, head_dim=head_dim, seq_len_q=seq_len, dropout_p=dropout_p, requires_grad=requires_grad)
    return select(target, call)


def priority_order(target: CudaTarget) -> tuple[Kernel, ...]:
    """Kernels in the order the selector tries them (`priority_order` and `check_prefer_cudnn_attention`)."""
    major, minor = target.capability
    prefer_cudnn = (
        not target.cudnn_deprioritized
        and target.cudnn_version > 91500
        and major in (9, 10)
        # CUDA 12 wheels (older cuDNN) also require minor 0 or 3
        and (target.cuda_version >= (13, 0) or minor in (0, 3))
    )
    if prefer_cudnn:
        return ("cudnn", "flash", "efficient", "math")
    return ("flash", "efficient", "math", "cudnn")  # the context's default order


def select(target: CudaTarget, call: SdpaCall) -> Kernel:
    """The first kernel in the target's priority order that accepts the call (`select_sdp_backend`)."""
    for kernel in priority_order(target):
        if kernel == "math" or _CHECKS[kernel](target, call):
            return kernel
    return "math"


def _in_range(capability: tuple[int, int], low: tuple[int, int], high: tuple[int, int]) -> bool:
    return low <= capability <= high


def _general(call: SdpaCall) -> bool:
    """Checks every fused kernel shares: 4-D dense inputs, non-empty sequences, matching batch and heads."""
    seq_k = call.seq_len_k if call.seq_len_k is not None else call.seq_len_q
    key_heads = call.key_heads if call.key_heads is not None else call.heads
    return (
        call.dims == 4
        and call.seq_len_q > 0
        and seq_k > 0
        and call.batch > 0
        and key_heads > 0
        and call.heads % key_heads == 0
    )


def _value_dim(call: SdpaCall) -> int:
    return call.value_head_dim if call.value_head_dim is not None else call.head_dim


def _cudnn(target: CudaTarget, call: SdpaCall) -> bool:
    """`can_use_cudnn_attention`: sm80-sm121, fp16/bf16, dropout a multiple of 1/16, head dims a multiple of 8 and
    at most 128 (256 on sm90/sm10x with a recent cuDNN), key length > 1, batch and heads <= 65535."""
    version = target.cudnn_version
    major, minor = target.capability
    seq_k = call.seq_len_k if call.seq_len_k is not None else call.seq_len_q
    d_qk, d_v = call.head_dim, _value_dim(call)
    if version < 90000 or target.deterministic:
        return False
    if call.dropout_p > 0.0 and 91100 < version < 91400:
        return False
    if not _general(call) or call.dtype not in ("fp16", "bf16"):
        return False
    if not _in_range(target.capability, (8, 0), (12, 1)):
        return False
    if call.dropout_p * 16.0 != int(call.dropout_p * 16.0):
        return False
    if not call.last_dim_contiguous:
        return False
    if call.batch > _MAX_CUDNN_DIM or call.heads > _MAX_CUDNN_DIM:
        return False
    sm90_or_sm10x = (major == 9 and minor == 0) or major == 10
    unsupported_sm107 = major == 10 and minor == 7 and version <= 92500
    limit = 128
    if sm90_or_sm10x and not unsupported_sm107 and version > 92200 and target.cudnn_frontend_d256:
        limit = 256
    elif sm90_or_sm10x and version >= 91100 and d_qk == 192 and d_v == 128:
        limit = 192
    if d_qk > limit or d_v > limit or d_qk % 8 or d_v % 8:
        return False
    if seq_k == 1 or (call.dropout_p != 0.0 and call.seq_len_q == 1):
        return False
    supports_d256 = version > 92200 and target.cudnn_frontend_d256 and sm90_or_sm10x and not unsupported_sm107
    if call.requires_grad and supports_d256:
        # backward supports (<=128, <=128), (192, 128) and (256, 256) only
        return (d_qk <= 128 and d_v <= 128) or (d_qk, d_v) in ((192, 128), (256, 256))
    return True


def _flash(target: CudaTarget, call: SdpaCall) -> bool:
    """`can_use_flash_attention`: sm80-sm121, fp16/bf16, no mask, equal head dims <= 256, and on sm86/89/120 no
    training with head dim in (192, 224] (or (224, 256] with dropout); causal only for square attention."""
    seq_k = call.seq_len_k if call.seq_len_k is not None else call.seq_len_q
    if not _general(call) or call.has_mask or call.dtype not in ("fp16", "bf16"):
        return False
    if call.head_dim != _value_dim(call) or call.head_dim > 256:
        return False
    if not _in_range(target.capability, (8, 0), (12, 1)):
        return False
    consumer = _in_range(target.capability, (8, 6), (8, 9)) or _in_range(target.capability, (12, 0), (12, 1))
    if call.requires_grad and consumer:
        supported = call.head_dim <= 192 or (call.dropout_p == 0.0 and call.head_dim > 224)
        if not supported:
            return False
    if call.is_causal and call.seq_len_q != seq_k:
        return False
    return call.last_dim_contiguous


def _gemm_alignment(target: CudaTarget, call: SdpaCall) -> int:
    """`minimum_gemm_alignment`: elements the head dims (and, on sm80+, storage offsets) must be multiples of."""
    major = target.capability[0]
    half = call.dtype in ("fp16", "bf16")
    tensor_cores = major >= 8 or (major >= 7 and half)
    alignment = 4 if major >= 8 else 1
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if half else 32))
    return alignment


def _efficient(target: CudaTarget, call: SdpaCall) -> bool:
    """`can_use_mem_efficient_attention`: sm50-sm121; fp16/fp32 (and bf16 on sm80+); head dims (and, on sm80+,
    storage offsets in bytes) aligned to the GEMM alignment; last dim contiguous."""
    if not _in_range(target.capability, (5, 0), (12, 1)) or not _general(call):
        return False
    alignment = _gemm_alignment(target, call)
    d_qk, d_v = call.head_dim, _value_dim(call)
    if d_qk <= 0 or d_v <= 0 or d_qk % alignment or d_v % alignment:
        return False
    if target.capability[0] >= 8 and any(offset % alignment for offset in call.storage_offsets):
        return False
    if not call.last_dim_contiguous:
        return False
    allowed = ("fp16", "fp32", "bf16") if target.capability[0] >= 8 else ("fp16", "fp32")
    return call.dtype in allowed


_CHECKS: Final = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient}


def kernel_label(kernel: str | None, target: CudaTarget = DEFAULT_TARGET) -> str | None:
    """The `attn_kernel` value of a CUDA estimate row: the kernel the trace ran, marked as predicted for the target
    (`cudnn (predicted, sm90)`); a measured row names only the kernel that ran."""
    if kernel is None:
        return None
    return f"{kernel} (predicted, {target.name})"
