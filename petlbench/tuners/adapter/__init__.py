"""Adapter: a sequential bottleneck after every block's MLP, the "Adapter" row of NOAH (docs/methods.md, "Adapter").

This is the adapter that NOAH (Zhang et al., 2022) trains as its Adapter baseline on VTAB-1k, the row that V-PETL
and later vision PETL tables quote: one bottleneck per block, applied to the MLP's output before the residual
add, with its own identity path (Houlsby-style), so a block computes

    h = MLP(LN2(x')),   x_out = x' + h + W_up·drop(act(W_down·h + b_down)) + b_up

with act = QuickGELU (z·sigmoid(1.702·z)), W_down r×D and W_up D×r. NOAH initialises both weights Xavier-uniform
and both biases N(0, 1e-6), so the tuned model is *not* the backbone at step 0 (`init: zero` starts W_up and
b_up at zero instead, which makes it the identity). Only the adapters and the new head train.
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
        "Adapter (NOAH's baseline): h + up(QuickGELU(down(h))) on every block's MLP output h, bottleneck 8, "
        "Xavier init (not the identity at step 0)."
    )

    bottleneck: int = Field(8, gt=0, description="bottleneck width r of down (D→r) and up (r→D)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the bottleneck activations (NOAH: 0)")
    init: Literal["xavier", "zero"] = Field(
        "xavier",
        description="'xavier': both weights Xavier-uniform, biases N(0, 1e-6) (NOAH); 'zero': up starts at zero, "
        "so the tuned model equals the backbone at step 0",
    )

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.adapter.layers import attach_adapter

        attach_adapter(model, self.bottleneck, self.dropout, self.init)
        return model
