"""LST: Ladder Side-Tuning (Sung et al., NeurIPS 2022), ported from T5 to a timm ViT (docs/methods.md, "LST").

A side network of transformer blocks r times narrower than the backbone (width D/r, MLP width h/r, head width
hd/r, same head count) runs beside the frozen ViT. Ladders feed it: a linear downsample of the token embedding
starts the side stream, and before side block i a learned gate mixes the side stream with a downsample of
backbone block i's output, `s ← g_i·s + (1 - g_i)·down_i(x_i)` with g_i = sigmoid(α_i / T). A final norm,
the backbone's pooling, a linear upsample to D and the classifier read the side stream out. The side blocks
start as structurally pruned copies of the backbone's blocks (L1 of weight rows, the official data-free
variant). The backbone runs under `torch.no_grad()`: nothing back-propagates into it.

Every port choice is listed in `layers.py` and docs/methods.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Lst(Tuner):
    """LST: a narrow side transformer fed by gated ladders from every backbone block; no backprop into the ViT."""

    name = "lst"
    knob = "reduction"
    brief = "ladder side network"
    summary = (
        "LST: a side transformer r times narrower than the ViT, initialised by pruning it, fed through gated "
        "linear ladders from the block outputs; the frozen backbone runs without autograd."
    )
    replaces = ()
    side_network = True

    reduction: int = Field(8, ge=2, le=64, description="reduction factor r: side width D/r (official default 8)")
    side_layers: tuple[int, ...] | None = Field(
        None,
        description="blocks that get a side block and a ladder (layer dropping), e.g. [1, 2, 3, 5, 6, 7, 9, 10, 11]; "
        "None: every block",
    )
    gate_alpha: float = Field(0.0, description="initial gate parameter α (gate g = sigmoid(α / T); official 0)")
    gate_temperature: float = Field(0.1, gt=0, description="gate temperature T (official 0.1)")
    init: Literal["prune", "random"] = Field(
        "prune",
        description="side blocks from the backbone's blocks pruned by row L1 norm ('prune'), or fresh ('random')",
    )
    ladder_bias: bool = Field(True, description="biases in the ladder downsamples and the upsample (official: on)")

    @field_validator("side_layers")
    @classmethod
    def _layers_valid(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one block (or be null for every block)")
        if any(i < 0 for i in value):
            raise ValueError(f"block indices must be >= 0, got {list(value)}")
        if len(set(value)) != len(value):
            raise ValueError(f"repeated blocks in {list(value)}")
        return tuple(sorted(value))

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.lst.layers import LstModel

        return LstModel(
            model,
            self.reduction,
            self.side_layers,
            self.gate_alpha,
            self.gate_temperature,
            self.init == "prune",
            self.ladder_bias,
        )
