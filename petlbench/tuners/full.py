"""Full fine-tuning: the baseline every PETL method is measured against (METHODS.md §3)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from petlbench.tuners import FullConfig
from petlbench.tuners.base import Tuner


class Full(Tuner[FullConfig]):
    """Every backbone parameter and the new head train; nothing is added."""

    config_cls = FullConfig

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()
