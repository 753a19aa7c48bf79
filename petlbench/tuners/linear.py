"""Linear probe: the cheapest baseline. The frozen backbone is a fixed feature extractor."""

from __future__ import annotations

from torch import nn

from petlbench.tuners import LinearConfig
from petlbench.tuners.base import Tuner


class Linear(Tuner[LinearConfig]):
    """Only the classifier head trains.

    No `no_grad` is needed around the backbone: with every backbone parameter frozen and an input that does not
    require grad, autograd records nothing before the head, so nothing is kept for backward.
    """

    config_cls = LinearConfig

    def attach(self, model: nn.Module) -> nn.Module:
        return model
