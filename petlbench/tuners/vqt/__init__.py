"""VQT: Visual Query Tuning (Tu et al., CVPR 2023; docs/methods.md, "VQT").

Every block i gets n learnable query tokens P_i. They enter the block beside the image tokens, but only as
queries: keys and values come from the image tokens alone, so the image tokens never see the queries and the
backbone's features are exactly those of the untouched ViT. Each block's query outputs (after its attention and
FFN) summarise that layer; the head reads the final class-token feature and the flattened query outputs of all
L layers, each L2-normalised, through one linear layer of width D + L·n·D.

Because the image tokens do not depend on any trainable parameter, the frozen token path runs once under
`torch.no_grad()`; backward only crosses the queries' own short paths (one block each), which need the keys and
values of every block's image tokens. The layers and the choices behind them are in `model.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Vqt(Tuner):
    """VQT: per-layer query tokens read the frozen features; the head concatenates their outputs."""

    name = "vqt"
    knob = "num_queries"
    brief = "query tokens in every block"
    summary = (
        "VQT: n learnable query tokens per block attend to the frozen image tokens (never the reverse); the "
        "L2-normalised class token and per-layer query outputs, concatenated, feed a linear head."
    )
    replaces = ()
    side_network = True

    num_queries: int = Field(
        1, gt=0, le=1024, description="query tokens n per block (the official VTAB-1k runs use 1, 10 or 20 per task)"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the query tokens before each block")
    normalize: bool = Field(
        True, description="L2-normalise the class token and each layer's flattened query outputs before the head"
    )
    backbone_mode: BackboneMode = backbone_mode_field(
        "eval", "'eval', as VQT's encoder overrides train() to keep every backbone module in eval"
    )
    head_init: HeadInit = head_init_field("vpt", "'vpt', the VPT code base's classifier init, which VQT keeps")

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.vqt.model import VqtModel

        return VqtModel(model, self.num_queries, self.dropout, self.normalize)
