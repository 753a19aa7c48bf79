"""Linear probe: the cheapest baseline. The frozen backbone is a fixed feature extractor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Linear(Tuner):
    """Only the classifier head trains.

    No `no_grad` is needed around the backbone: with every backbone parameter frozen and an input that does not
    require grad, autograd records nothing before the head, so nothing is kept for backward.
    """

    name = "linear"
    summary = "Linear probe: frozen backbone, only the new classifier head trains."
    adds_parameters = False

    def attach(self, model: nn.Module) -> nn.Module:
        return model
