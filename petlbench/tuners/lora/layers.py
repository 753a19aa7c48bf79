"""LoRA's layer: a wrapper around timm's fused qkv Linear that adds low-rank deltas to chosen thirds of its output.

The deltas are added in place into the slices of the frozen qkv output: this keeps no extra activation beyond
what LoRA itself needs (the qkv input for A, and A's output for B), so the memory we report is LoRA's, not an
artefact of concatenating zero blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import MergeableLayer, wrap_block_linears

_PARTS = ("q", "k", "v")


class LoraQkv(MergeableLayer):
    """Wraps a fused qkv `nn.Linear` (kept as `base`) and adds low-rank deltas to chosen thirds of its output."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, targets: tuple[str, ...], dropout: float) -> None:
        super().__init__()
        if base.out_features % 3:
            raise TunerError(f"lora: qkv has {base.out_features} outputs, not a multiple of 3 (fused q|k|v)")
        self.base = base
        self.part_dim = base.out_features // 3
        self.scale = alpha / rank
        self.targets = targets
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ModuleDict({t: nn.Linear(base.in_features, rank, bias=False, **factory) for t in targets})
        self.lora_B = nn.ModuleDict({t: nn.Linear(rank, self.part_dim, bias=False, **factory) for t in targets})
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for t in self.targets:
            a, b = self.lora_A[t], self.lora_B[t]
            assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def delta_weight(self, part: str) -> torch.Tensor:
        """(alpha/r)·B A for one of q/k/v: the increment of that third of the qkv weight."""
        a, b = self.lora_A[part], self.lora_B[part]
        assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
        delta: torch.Tensor = (b.weight @ a.weight) * self.scale
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x)
        for index, part in enumerate(_PARTS):
            if part in self.lora_A:
                delta = self.lora_B[part](self.lora_A[part](h))
                lo = index * self.part_dim
                out[..., lo : lo + self.part_dim].add_(delta, alpha=self.scale)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for index, part in enumerate(_PARTS):
            if part in self.lora_A:
                lo = index * self.part_dim
                self.base.weight[lo : lo + self.part_dim] += self.delta_weight(part).to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for index, part in enumerate(_PARTS):
            if part in self.lora_A:
                lo = index * self.part_dim
                self.base.weight[lo : lo + self.part_dim] -= self.delta_weight(part).to(self.base.weight.dtype)
        self.merged = False


def attach_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], dropout: float) -> None:
    """Wrap every block's `attn.qkv` in a LoraQkv."""

    def wrap(index: int, path: str, qkv: nn.Linear) -> nn.Module:
        limit = min(qkv.in_features, qkv.out_features // 3)
        if rank > limit:
            raise TunerError(f"lora: tuner.rank {rank} exceeds the qkv width {limit}; choose rank ≤ {limit}")
        return LoraQkv(qkv, rank, alpha, targets, dropout)

    wrap_block_linears(model, ["attn.qkv"], wrap, "lora")
