"""BitFit: only the bias terms train (Ben Zaken et al., ACL 2022; docs/methods.md, "BitFit").

The whole tuner is this file plus its line in the registry: BitFit adds no module and no parameter, it only
chooses which existing parameters train. Which biases is the one decision, and it follows the vision PETL code
(OSU-MLB/PETL_Vision, `experiment/build_model.py`: every backbone parameter whose name contains `bias`): the bias
of every module that has one, i.e. on a timm ViT the patch-embedding convolution, every LayerNorm (norm1, norm2,
the final norm) and every Linear (qkv, proj, fc1, fc2), plus the new head. The choice here is structural (a
module's own parameter registered as `bias`), not a substring match on names, so a parameter such as a relative
position bias table is not caught by accident; on a timm ViT both rules pick the same set.

The new head is PyTorch's `nn.Linear` default (`head_init: torch`): PETL_Vision builds it with `reset_classifier`
of the timm it pins (0.9.12), which creates a plain `nn.Linear` and draws nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from petlbench.tuners.base import HeadInit, Tuner, head_init_field

if TYPE_CHECKING:
    from torch import nn


class Bitfit(Tuner):
    """Every bias of the backbone and the new head train; nothing is added."""

    name = "bitfit"
    brief = "only biases and head train"
    summary = "BitFit: only the biases train (patch embed, every LayerNorm and Linear) plus the new head."
    adds_parameters = False
    identity_at_init = True  # nothing changes until the first step
    replaces = ()
    trains_backbone = True

    head_init: HeadInit = head_init_field(
        "torch", "'torch', what PETL_Vision's reset_classifier (timm 0.9.12: a plain nn.Linear) gives"
    )

    def attach(self, model: nn.Module) -> nn.Module:
        return model

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        from petlbench.tuners.layers import classifier_heads

        chosen: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for param_name, param in module.named_parameters(recurse=False):  # the module's own, not a child's
                if param_name == "bias":
                    chosen[id(param)] = param
        for head in classifier_heads(model, self.name):  # the head's weight too (both heads of a distilled DeiT)
            for param in head.parameters():
                chosen[id(param)] = param
        return list(chosen.values())
