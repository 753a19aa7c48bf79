"""AdaptFormer's layers: the scaled ReLU bottleneck, and the block wrapper that feeds it the block's mid stream.

The parallel adapter reads x', the tokens between the attention residual and the MLP's LayerNorm, which no
submodule of a timm block receives (the MLP gets LN2(x')). So the whole block is wrapped, and the wrapper runs the
block's own submodules in timm `Block.forward`'s order, adding the adapter's output next to the MLP branch.
Only blocks whose class runs timm's `Block.forward` unchanged are accepted, so that order is known to be right.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import read_block_linear, require_timm_block, vit_blocks


class AdaptMlp(nn.Module):
    """s·up(drop(ReLU(down(x)))), with the optional LayerNorm before or after (official `Adapter`, 'lora' init)."""

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        scale: float | Literal["learnable"],
        dropout: float,
        layernorm: Literal["none", "in", "out"],
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        device, dtype = like.device, like.dtype
        self.layernorm = layernorm
        self.norm: nn.Module = nn.LayerNorm(dim, device=device, dtype=dtype) if layernorm != "none" else nn.Identity()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale: nn.Parameter | float = (
            nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if scale == "learnable" else scale
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layernorm == "in":
            x = self.norm(x)
        out: torch.Tensor = self.up(self.dropout(torch.relu(self.down(x)))) * self.scale
        if self.layernorm == "out":
            out = self.norm(out)
        return out


class AdaptFormerBlock(nn.Module):
    """Wraps a timm `Block` (kept as `base`) and adds the AdaptMLP branch beside (or after) its MLP."""

    def __init__(self, base: nn.Module, adapter: AdaptMlp, mode: Literal["parallel", "sequential"]) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.mode = mode

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b: Any = self.base  # a timm Block (checked in attach_adaptformer)
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        h = b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        # official: the parallel branch sees x' and skips drop path; the sequential one sees the MLP output h
        out: torch.Tensor = x + h + self.adapter(x if self.mode == "parallel" else h)
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


def attach_adaptformer(
    model: nn.Module,
    bottleneck: int,
    scale: float | Literal["learnable"],
    dropout: float,
    layernorm: Literal["none", "in", "out"],
    mode: Literal["parallel", "sequential"],
) -> None:
    """Wrap every block in an AdaptFormerBlock; every block is checked before any is changed."""

    blocks = vit_blocks(model, "adaptformer")
    targets: list[tuple[int, nn.Module, nn.Linear]] = []
    for i, block in enumerate(blocks):
        if isinstance(block, AdaptFormerBlock):
            raise TunerError(f"adaptformer: blocks[{i}] already has an adapter; attach AdaptFormer once")
        require_timm_block(block, i, "adaptformer", "AdaptFormer")
        fc2 = read_block_linear(block, "mlp.fc2", i, "adaptformer")  # the MLP's output width is the adapter's
        if bottleneck > fc2.out_features:
            raise TunerError(
                f"adaptformer: tuner.bottleneck {bottleneck} exceeds the embedding width {fc2.out_features}; "
                f"choose bottleneck ≤ {fc2.out_features}"
            )
        targets.append((i, block, fc2))
    for i, block, fc2 in targets:
        adapter = AdaptMlp(fc2.out_features, bottleneck, scale, dropout, layernorm, fc2.weight)
        blocks[i] = AdaptFormerBlock(block, adapter, mode)
