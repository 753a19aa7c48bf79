"""Adapter: a sequential bottleneck after every block's MLP, the "Adapter" row of NOAH (docs/methods.md, "Adapter").

This is the adapter that NOAH (Zhang et al., 2022) trains as its Adapter baseline on VTAB-1k, the row that V-PETL
and later vision PETL tables quote: one bottleneck per block, applied to the MLP's output before the residual
add, with its own identity path (Houlsby-style), so a block computes

    h = MLP(LN2(x')),   x_out = x' + h + W_up·drop(act(W_down·h + b_down)) + b_up

with act = QuickGELU (z·sigmoid(1.702·z)), W_down r×D and W_up D×r. Init as NOAH's model ends up: its
`AdapterSuper` draws Xavier-uniform weights and N(0, 1e-6) biases, but the `VisionTransformer` that holds it then
runs its init over the whole model, which re-draws every Linear (the adapters' too) truncated normal, std 0.02,
with zero biases; that is the default (`init: noah`). So the tuned model is *not* the backbone at step 0
(`init: zero` starts W_up and b_up at zero instead, which makes it the identity). Dropout 0.1 on the bottleneck,
the default of NOAH's `--drop_rate_adapter` that its VTAB script keeps. Only the adapters and the new head train.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Adapter(Tuner):
    """A bottleneck adapter (down, QuickGELU, up, plus identity) after every block's MLP."""

    name = "adapter"
    knob = "bottleneck"
    brief = "bottleneck after every MLP"
    summary = (
        "Adapter (NOAH's baseline): h + up(drop(QuickGELU(down(h)))) on every block's MLP output h, bottleneck 8, "
        "dropout 0.1, weights truncated normal std 0.02 (not the identity at step 0)."
    )
    replaces = ()
    wraps = ("blocks.mlp",)  # AdapterMlp calls the MLP unchanged and adds the bottleneck to its output

    bottleneck: int = Field(8, gt=0, description="bottleneck width r of down (D→r) and up (r→D)")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout on the bottleneck activations (NOAH's --drop_rate_adapter: 0.1)"
    )
    init: Literal["noah", "xavier", "zero"] = Field(
        "noah",
        description="'noah': weights truncated normal std 0.02, zero biases (what NOAH's model-wide init leaves); "
        "'xavier': weights Xavier-uniform, biases N(0, 1e-6) (AdapterSuper's own draw, which NOAH then "
        "overwrites); 'zero': as 'xavier' but up starts at zero, so the tuned model equals the backbone at step 0",
    )

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.adapter.layers import attach_adapter

        attach_adapter(model, self.bottleneck, self.dropout, self.init)
        return model
