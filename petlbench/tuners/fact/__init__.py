"""FacT, Factor-Tuning (Jie & Deng, AAAI 2023), variants TT and TK (docs/methods.md, "FacT").

FacT views the weight increments of every block's linear maps as D×D slices: q, k, v (the thirds of timm's fused
qkv), o (proj), and the k = hidden/D slices of fc1 (output rows) and of fc2 (input columns). k is 4 for ViT-B and
is read from the model. Each slice's increment is `s·V·M·U`: U (r×D) and V (D×r) are shared by all slices of all
blocks, M is an r×r core.

- TT: every slice has its own free core (Kaiming-uniform), so a block trains (4 + 2k)·r² numbers.
- TK: the cores come from one r×r×r tensor C and a slice-factor matrix P (r × L·(4 + 2k)), both Xavier-uniform:
  `M_j = Σ_c C[:, :, c]·P[c, j]`. Block b uses the next 4 + 2k columns of P, in the order q, k, v, o, fc1, fc2.

Every wrapped Linear computes `base(x) + V_blocks(dropout(s·K · U_blocks(x)))`: x is cut into D-wide input chunks
(k for fc2, one otherwise), U maps each chunk to r numbers, the layer's core map K ((out chunks·r) × (in chunks·r))
mixes them, and V maps each r-wide output chunk to D outputs (3 for qkv, k for fc1, one otherwise). V is zero at
init, so the tuned model equals the backbone at step 0. The increment is added in place into the frozen Linear's
output (no concatenation with zero blocks); the scale is folded into the small core, so no full-width tensor is
made for it in forward or backward.

Merging folds `dW[o-th D rows, i-th D columns] = V·(s·K)[o-th r rows, i-th r columns]·U` into each weight
(§2.4); biases are untouched.

The TK fc1/fc2 cores follow the official code's reshape order, so official checkpoints map one to one: the k fc1
(or fc2) slice cores form an r×r×k tensor that is flattened row-major to r×(k·r), and its k column blocks of
width r are the per-chunk cores. Differences from the official code, none of which change the function: wrappers
around the four Linears instead of a rebound attention/MLP forward (timm's own fused or plain attention runs
unchanged), U·x computed once per layer instead of once per q/k/v, and one dropout over the concatenated q|k|v
codes (the same distribution as three independent masks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Fact(Tuner):
    """FacT-TT / FacT-TK on every block's qkv, proj, fc1 and fc2."""

    name = "fact"
    knob = "rank"
    brief = "tensorised low-rank deltas"
    summary = (
        "FacT: each block's qkv/proj/fc1/fc2 increment is s·V·core·U with U, V shared by all blocks; TT gives every "
        "D×D slice its own r×r core, TK builds the cores from one r×r×r tensor and slice factors P; V starts at 0."
    )
    mergeable = True
    identity_at_init = True
    replaces = ("blocks.attn.qkv", "blocks.attn.proj", "blocks.mlp.fc1", "blocks.mlp.fc2")

    variant: Literal["tt", "tk"] = Field(
        "tt", description="'tt' (tensor-train: a free core per weight slice) or 'tk' (Tucker: shared C and P)"
    )
    rank: int = Field(8, gt=0, description="rank r of the shared factors U (r×D) and V (D×r) and of every core")
    scale: float = Field(1.0, gt=0, description="global scale s of every increment (the official configs use 0.01-100)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on each core's output (the r-dim code before V)")
    backbone_mode: BackboneMode = backbone_mode_field(
        "train", "'train', as FacT's code trains (model.train(): drop path active in the frozen backbone)"
    )
    head_init: HeadInit = head_init_field("torch", "'torch', what timm 0.4.12's reset_classifier gives FacT")

    def method(self) -> str:
        return f"fact-{self.variant}"

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.fact.layers import attach_fact

        attach_fact(model, self.variant, self.rank, self.scale, self.dropout)
        return model
