"""Linear probe: the cheapest baseline. The frozen backbone is a fixed feature extractor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from petlbench.tuners.base import BackboneMode, HeadInit, Tuner, backbone_mode_field, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Linear(Tuner):
    """Only the classifier head trains.

    No `no_grad` is needed around the backbone: with every backbone parameter frozen and an input that does not
    require grad, autograd records nothing before the head, so nothing is kept for backward.
    """

    name = "linear"
    brief = "only a new linear head trains"
    summary = "Linear probe: frozen backbone, only the new classifier head trains."
    adds_parameters = False
    replaces = ()

    # The "Linear" rows every VTAB table quotes come from the VPT paper, so VPT's code is the reference here.
    backbone_mode: BackboneMode = backbone_mode_field(
        "eval", "'eval', as VPT's code runs a linear probe (a frozen encoder is switched to eval in forward)"
    )
    head_init: HeadInit = head_init_field(
        "vpt", "'vpt', the head of VPT's code, where the quoted Linear rows come from"
    )

    def attach(self, model: nn.Module) -> nn.Module:
        return model
