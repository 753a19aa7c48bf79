"""LoRA on the q and v projections of timm's fused qkv (docs/methods.md, "LoRA").

For a frozen W0 the layer computes `W0 x + (alpha/r)·B A x` with A (r×in) Kaiming-uniform and B (out×r) zero,
so the tuned model equals the backbone at step 0. timm fuses q, k, v into one Linear whose output rows are
[q | k | v]; each targeted third gets its own A/B pair, and k is left alone by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Lora(Tuner):
    """LoRA on every block's attention (q and v by default)."""

    name = "lora"
    knob = "rank"
    brief = "low-rank deltas on q and v"
    summary = "LoRA: low-rank deltas (alpha/r)·B·A on the q and v rows of each block's fused qkv; B starts at zero."
    mergeable = True
    identity_at_init = True
    replaces = ("blocks.attn.qkv",)

    rank: int = Field(8, gt=0, description="rank r of each A (r×in) / B (out×r) pair")
    alpha: float | None = Field(
        None, gt=0, description="scale numerator; the delta is (alpha/rank)·BA; None means alpha = rank"
    )
    targets: tuple[Literal["q", "k", "v"], ...] = Field(("q", "v"), description="which of q, k, v get a delta")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input path")
    # NOAH's LoRA code (behind the "LoRA 0.29M" rows): model.train() every epoch, head from its reset_classifier
    backbone_mode: BackboneMode = backbone_mode_field("train", "'train', as NOAH's LoRA runs (model.train())")
    head_init: HeadInit = head_init_field(
        "timm", "'timm', what NOAH's reset_classifier draws (truncated normal std 0.02, zero bias)"
    )

    @field_validator("targets")
    @classmethod
    def _targets_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one of q, k, v")
        if len(set(value)) != len(value):
            raise ValueError(f"repeated entries in {list(value)}")
        return tuple(t for t in ("q", "k", "v") if t in value)

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.lora.layers import attach_lora

        alpha = self.alpha if self.alpha is not None else float(self.rank)
        attach_lora(model, self.rank, alpha, self.targets, self.dropout)
        return model
