"""DTL's Compact Side Network and the tuned model around the frozen ViT.

Design choices (the official code and every deviation: docs/methods.md, "DTL"):

- **The frozen blocks are called as they are**, one by one (no wrapper, no rebinding). Blocks 0..M run under
  `torch.no_grad()`: their inputs depend on no trainable parameter, so nothing of them is needed for backward
  (autograd would record nothing there anyway; `no_grad` makes it explicit). The CSN maps read those block
  inputs with autograd on, because their own weights need the inputs for their gradients. Blocks after M run
  with autograd (their inputs carry the side state) and honour the backbone's `grad_checkpointing` flag.
- **Side map** `x Aᵀ Bᵀ` with A (r×D) Kaiming-uniform (a=√5) and B (D×r) zero, evaluated left to right as the
  official `x @ A.T @ B.T`, so the rank-r intermediate is what is kept, never a D×D product.
- **DTL+ fusion**: the official code hard-codes ViT-B/16's 14×14 grid and keeps token 0 (the class token) out
  of the convolution; here the grid comes from the patch embedding (the input's size for dynamic-size models)
  and all prefix tokens (class, register) stay out of it. Conv2d(D, D, k, groups=D, padding="same", no bias),
  PyTorch's default init, shared by every block from M on.
- **Head input**: mean of the patch tokens (prefix tokens excluded), then the backbone's final norm (`norm`, or
  `fc_norm` for models that have it instead), `head_drop` and the classifier; the official model pools before
  its final LayerNorm the same way. Not the backbone's own class-token readout, so not the identity at init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from petlbench.errors import TunerError
from petlbench.tuners.layers import single_head, vit_blocks


def swish(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The official `x * sigmoid(beta * x)`."""
    return x * torch.sigmoid(x * beta)


class LowRankSideMap(nn.Module):
    """One CSN map `x Aᵀ Bᵀ`: A (r×D) Kaiming-uniform, B (D×r) zero (official `LoRALinear`)."""

    def __init__(self, dim: int, rank: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, dim, **factory))
        self.lora_B = nn.Parameter(torch.zeros(dim, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.lora_A.T @ self.lora_B.T


class DtlModel(nn.Module):
    """The timm ViT (`backbone`) with DTL's side maps on every block input and the side state added from block M."""

    def __init__(self, backbone: nn.Module, rank: int, start: int | None, beta: float, fusion_size: int) -> None:
        super().__init__()
        single_head(backbone, "dtl")
        vit: Any = backbone
        blocks = vit_blocks(backbone, "dtl")
        dim, depth = int(vit.embed_dim), len(blocks)
        start = depth // 2 if start is None else start
        if start >= depth:
            raise TunerError(
                f"dtl: tuner.start {start} is not a block of this {depth}-block ViT; choose 0..{depth - 1}"
            )
        if rank > dim:
            raise TunerError(f"dtl: tuner.rank {rank} exceeds the embedding width {dim}; choose rank <= {dim}")
        if getattr(vit, "attn_pool", None) is not None or not hasattr(vit, "num_prefix_tokens"):
            raise TunerError(
                "dtl: backbone needs timm's VisionTransformer token layout (num_prefix_tokens, no attention pool)"
            )
        ref = next(backbone.parameters())
        factory: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype}

        self.backbone = backbone
        self.start = start
        self.beta = beta
        self.csn = nn.ModuleList(LowRankSideMap(dim, rank, factory) for _ in range(depth))
        self.fusion: nn.Conv2d | None = None
        if fusion_size > 0:
            self.fusion = nn.Conv2d(dim, dim, fusion_size, stride=1, padding="same", groups=dim, bias=False, **factory)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return cast(Sequence[nn.Module], self.backbone.blocks)

    def _grid(self, image: torch.Tensor) -> tuple[int, int]:
        embed: Any = cast(Any, self.backbone).patch_embed
        if getattr(self.backbone, "dynamic_img_size", False):
            h, w = embed.dynamic_feat_size(tuple(image.shape[-2:]))
        else:
            h, w = embed.grid_size
        return int(h), int(w)

    def side_output(self, residual: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """What block outputs from M on receive: swish of the side state, DTL+-fused over the patch grid."""
        act = swish(residual, self.beta)
        if self.fusion is None:
            return act
        prefix = int(cast(Any, self.backbone).num_prefix_tokens)
        b, n, d = act.shape
        h, w = grid
        if n - prefix != h * w:
            raise TunerError(f"dtl: {n - prefix} patch tokens do not form the {h}x{w} patch grid DTL+ convolves")
        patches = act[:, prefix:].reshape(b, h, w, d).permute(0, 3, 1, 2)
        fused = self.fusion(patches).permute(0, 2, 3, 1).reshape(b, h * w, d)
        return torch.cat([act[:, :prefix], fused], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.backbone
        grid = self._grid(x)
        with torch.no_grad():
            t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        residual: torch.Tensor | None = None
        for i, (blk, side_map) in enumerate(zip(self.blocks, self.csn, strict=True)):
            extracted = side_map(t)
            residual = extracted if residual is None else residual + extracted
            if i <= self.start:  # no trainable input yet: nothing here is needed for backward
                with torch.no_grad():
                    t = blk(t)
            elif m.grad_checkpointing and self.training and torch.is_grad_enabled():
                t = checkpoint(blk, t, use_reentrant=False)
            else:
                t = blk(t)
            if i >= self.start:
                t = t + self.side_output(residual, grid)
        pooled = t[:, int(m.num_prefix_tokens) :].mean(dim=1)
        f = m.head_drop(m.fc_norm(m.norm(pooled)))
        logits: torch.Tensor = m.get_classifier()(f)
        return logits
