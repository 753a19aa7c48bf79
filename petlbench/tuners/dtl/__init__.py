"""DTL: Disentangled Transfer Learning with a Compact Side Network (Fu et al., AAAI 2024; docs/methods.md, "DTL").

A Compact Side Network (CSN) of one rank-r map per block, `x_i ↦ x_i Aᵢᵀ Bᵢᵀ` on block i's input tokens, sums
what it extracts into a running side state R_i = Σ_{j ≤ i} x_j Aⱼᵀ Bⱼᵀ. From block M on, the backbone's
stream gets the side state back after every block: x_{i+1} = block_i(x_i) + swish_β(R_i), with
swish_β(u) = u·sigmoid(β u). DTL+ (`fusion_size` > 0) passes the swished patch tokens through one shared
depthwise k×k convolution over the patch grid first. The head reads the mean of the patch tokens after the
backbone's final norm, as the official model does. Only the CSN (and DTL+'s convolution) and the head train.

Memory: blocks 0..M see no trainable input, so they run under `no_grad` and keep nothing for backward, but the
side state re-enters the stream after block M, so blocks M+1..L-1 *are* back-propagated through (frozen
weights, trainable inputs), like a partial LoRA. The layers are in `layers.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Dtl(Tuner):
    """DTL/DTL+: low-rank side maps of every block's input, added back after the blocks from M on."""

    name = "dtl"
    knob = "rank"
    brief = "low-rank side path"
    summary = (
        "DTL: a compact side network of rank-r maps over each block's input, summed and added back (swish) "
        "to the outputs of blocks M..L-1; DTL+ adds a depthwise conv over the patch grid."
    )
    replaces = ()
    side_network = True

    rank: int = Field(2, gt=0, description="rank r of each block's side map A (r×D), B (D×r); official VTAB: 2")
    start: int | None = Field(
        None,
        ge=0,
        description="first block M whose output gets the side state back (official VTAB, 12 blocks: 6); "
        "None: half the depth, L // 2",
    )
    beta: float = Field(100.0, gt=0, description="swish slope β in u·sigmoid(β u) (official VTAB: 100)")
    fusion_size: int = Field(
        0,
        ge=0,
        le=15,
        description="DTL+: kernel size of the depthwise conv over the patch grid (official per task: 3, 4 or 5); "
        "0: plain DTL",
    )

    def method(self) -> str:
        return "dtl+" if self.fusion_size > 0 else "dtl"

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.dtl.layers import DtlModel

        return DtlModel(model, self.rank, self.start, self.beta, self.fusion_size)
