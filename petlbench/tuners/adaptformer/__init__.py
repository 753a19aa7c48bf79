"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck beside every block's MLP (docs/methods.md,
"AdaptFormer").

The official image code (ShoufaChen/AdaptFormer, `models/custom_modules.py` and `models/adapter.py`) computes,
for a block's mid-stream tokens x' (after the attention residual, *before* the MLP's LayerNorm):

    x_out = x' + MLP(LN2(x')) + s·(W_up·drop(ReLU(W_down·x' + b_down)) + b_up)      (parallel, the default)

W_down (r×D) is Kaiming-uniform(a=√5) and W_up (D×r) and both biases start at zero ('lora' init), so the tuned
model equals the backbone at step 0; s is a fixed 0.1 or a learnable scalar (init 1). `layernorm: in` puts a new
LayerNorm on the adapter input, `out` on its scaled output (the official `adapter_layernorm_option`; the image
script uses `none`). `mode: sequential` feeds the MLP output h instead and returns h + adapter(h). Only the
adapters and the new head train. The new head starts as `main_image.py` leaves it (`head_init: adaptformer`): the
model's `nn.Linear` with its weight re-drawn truncated normal, std 0.01, and nn.Linear's default bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from petlbench.tuners.base import HeadInit, Tuner, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Adaptformer(Tuner):
    """AdaptMLP: a parallel ReLU bottleneck on each block's MLP input stream, scaled by s, zero-init up."""

    name = "adaptformer"
    knob = "bottleneck"
    brief = "scaled bottleneck beside MLP"
    summary = (
        "AdaptFormer: s·up(ReLU(down(x))) beside every block's MLP, fed the block's mid stream; bottleneck 64, "
        "s = 0.1, up starts at zero."
    )
    identity_at_init = True
    replaces = ("blocks",)  # AdaptFormerBlock re-runs a timm Block from its submodules, adding the branch

    bottleneck: int = Field(64, gt=0, description="bottleneck width r of down (D→r) and up (r→D)")
    scale: float | Literal["learnable"] = Field(
        0.1, description="output scale s, a number > 0 (official: 0.1) or 'learnable' (a trained scalar, init 1)"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the bottleneck activations (official: 0.1)")
    layernorm: Literal["none", "in", "out"] = Field(
        "none", description="a new LayerNorm on the adapter input ('in') or its scaled output ('out'); official: none"
    )
    mode: Literal["parallel", "sequential"] = Field(
        "parallel", description="'parallel': beside the MLP, fed its input stream; 'sequential': on the MLP output"
    )
    head_init: HeadInit = head_init_field(
        "adaptformer", "'adaptformer', main_image.py's head (weight truncated normal std 0.01, nn.Linear's bias)"
    )

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, value: float | str) -> float | str:
        if isinstance(value, float) and value <= 0:
            raise ValueError(f"must be > 0 or 'learnable', got {value}")
        return value

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.adaptformer.layers import attach_adaptformer

        attach_adaptformer(model, self.bottleneck, self.scale, self.dropout, self.layernorm, self.mode)
        return model
