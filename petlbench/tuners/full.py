"""Full fine-tuning: the baseline every PETL method is measured against (docs/methods.md, "Full fine-tuning")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Full(Tuner):
    """Every backbone parameter and the new head train; nothing is added."""

    name = "full"
    brief = "all weights and the head train"
    summary = "Full fine-tuning: every backbone parameter and the new head train."
    adds_parameters = False
    replaces = ()
    trains_backbone = True

    # The "Full" rows every VTAB table quotes come from the VPT paper, so VPT's code is the reference here.
    backbone_mode: BackboneMode = backbone_mode_field(
        "train", "'train', as VPT's code fine-tunes (end2end: the whole model in train mode)"
    )
    head_init: HeadInit = head_init_field("vpt", "'vpt', the head of VPT's code, where the quoted Full rows come from")

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()
