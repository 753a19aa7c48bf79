"""The Adapter's layers: NOAH's bottleneck and the wrapper that puts it after a block's MLP."""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import read_block_linear, vit_blocks

AdapterInit: TypeAlias = Literal["noah", "xavier", "zero"]
# NOAH's VisionTransformer.init_weights → timm's _init_vit_weights: every nn.Linear trunc_normal_(std=.02), bias 0.
# timm's trunc_normal_ cuts at the absolute values ±2 (100 std), so the draw is a plain normal in effect.
NOAH_LINEAR_STD = 0.02


def noah_linear_init_(linear: nn.Linear) -> None:
    """What NOAH's model-wide init leaves in any Linear it did not load from the checkpoint."""
    nn.init.trunc_normal_(linear.weight, std=NOAH_LINEAR_STD, a=-2.0, b=2.0)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class Bottleneck(nn.Module):
    """up(drop(QuickGELU(down(h)))), without the identity term (the wrapper adds h)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, init: AdapterInit, like: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(bottleneck, dim, device=like.device, dtype=like.dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.down, self.up):
            if self.init == "noah":
                noah_linear_init_(linear)
            else:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        if self.init == "zero":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.down(h)
        z = z * torch.sigmoid(1.702 * z)  # QuickGELU, as NOAH's adapter
        out: torch.Tensor = self.up(self.dropout(z))
        return out


class AdapterMlp(nn.Module):
    """Wraps a block's MLP (kept as `base`): returns h + adapter(h) for the MLP output h."""

    def __init__(self, base: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.base(x)
        out: torch.Tensor = h + self.adapter(h)
        return out


def attach_adapter(model: nn.Module, bottleneck: int, dropout: float, init: AdapterInit) -> None:
    """Wrap every block's `mlp` in an AdapterMlp; every block is checked before any is changed."""
    blocks = vit_blocks(model, "adapter")
    targets: list[tuple[nn.Module, nn.Linear]] = []
    for i, block in enumerate(blocks):
        if isinstance(getattr(block, "mlp", None), AdapterMlp):
            raise TunerError(f"adapter: blocks[{i}].mlp already has an adapter; attach the adapter once")
        fc2 = read_block_linear(block, "mlp.fc2", i, "adapter")  # the MLP's output width is the adapter's
        if bottleneck > fc2.out_features:
            raise TunerError(
                f"adapter: tuner.bottleneck {bottleneck} exceeds the embedding width {fc2.out_features}; "
                f"choose bottleneck ≤ {fc2.out_features}"
            )
        targets.append((block, fc2))
    for block, fc2 in targets:
        adapter = Bottleneck(fc2.out_features, bottleneck, dropout, init, fc2.weight)
        block.register_module("mlp", AdapterMlp(block.get_submodule("mlp"), adapter))
