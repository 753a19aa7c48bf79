"""SQT / SynQT: disentangled query tuning (Zhang et al., ECCV 2024).

The frozen ViT runs once over the image tokens (the *token path*) under `torch.no_grad()`; nothing on it is kept
for backward. A small trainable *query path* runs beside it: per layer i, a Query Synthesis Module (QSM) turns
learned queries P_i and the previous layer's query feature H_{i-1} into n query tokens, and block i itself,
applied query-only (Knowledge Extraction, KEM), lets them attend to the frozen keys/values of that block's
input tokens and passes them through the block's frozen FFN. An instance-aware head mixes the per-layer query
features (3L+1 tokens) into the classifier input. Gradients flow only along the query chain (n tokens, one
token between layers), so what training keeps is the query path plus each block's K_i, V_i.

The layers and the design choices behind them are in `model.py`; the numbers in docs/methods.md, "SQT".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Sqt(Tuner):
    """SQT/SynQT: a trainable query path reads the frozen ViT's keys/values; backprop never enters the backbone."""

    name = "sqt"
    knob = "num_queries"
    brief = "side queries read frozen K/V"
    summary = (
        "SQT/SynQT: learned per-layer queries read the frozen backbone's keys/values; only the query path "
        "and an instance-aware head train."
    )
    replaces = ()
    side_network = True

    num_queries: int = Field(4, gt=0, description="query tokens per layer n (the paper uses 1, 4 or 16)")
    rank: int = Field(48, gt=0, description="bottleneck of the projection, FFN and head adapters")
    attn_rank: int = Field(8, gt=0, description="bottleneck of the q/k/v/o adapters of the query self-attention")
    attn_scale: float = Field(0.1, description="initial value of each layer's learnable attention-branch scale")
    ffn_scale: float = Field(0.1, description="initial value of each layer's learnable FFN-branch scale")
    feat_scale: float = Field(0.1, description="initial value of the shared scale on the previous layer's query")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout in the rank adapters, query attention and head weight generator"
    )
    head_drop_path: float = Field(0.3, ge=0.0, lt=1.0, description="per-token drop path on head tokens 2..3L+1")
    backbone_mode: BackboneMode = backbone_mode_field(
        "train",
        "'train', as SynQT's code trains (model.train(): the frozen blocks' drop path acts on the token path and "
        "on the queries)",
    )
    head_init: HeadInit = head_init_field("torch", "'torch', what timm 0.4.12's reset_classifier gives SynQT")

    def dropout_rates(self) -> tuple[float, ...]:
        return (self.dropout,)

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.sqt.model import SqtModel

        return SqtModel(model, self)
