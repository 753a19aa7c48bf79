"""Full fine-tuning: the baseline every PETL method is measured against (docs/methods.md, "Full fine-tuning")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Full(Tuner):
    """Every backbone parameter and the new head train; nothing is added."""

    name = "full"
    summary = "Full fine-tuning: every backbone parameter and the new head train."
    adds_parameters = False

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()
