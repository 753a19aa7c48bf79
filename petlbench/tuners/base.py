"""The tuner interface and the one function that builds a tuned model.

Rules for implementers:
- Wrap, never rebind: replace a submodule with a wrapper that holds the original (`blocks[i].attn.qkv =
  LoraQkv(base=...)`), or return a new root module that holds the backbone. No instance-level `forward`.
- Read dimensions from the model (`model.embed_dim`, `len(model.blocks)`, `qkv.in_features`); never 768/12.
- Every parameter a tuner creates trains; existing parameters train only if `trainable_backbone_parameters`
  returns them (the head by default). `requires_grad`, the optimizer, data and device belong to the caller.
- Custom attention honours `attn.fused_attn` so every tuner runs under the same kernel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners import TunerConfig

C = TypeVar("C", bound=TunerConfig)


class MergeableLayer(nn.Module, ABC):
    """A wrapper whose increment can be folded into the weights of the layer it wraps, and taken out again."""

    @abstractmethod
    def merge(self) -> None: ...

    @abstractmethod
    def unmerge(self) -> None: ...


class Tuner(ABC, Generic[C]):
    """A parameter-efficient (or full) tuning method applied to a timm VisionTransformer."""

    config_cls: ClassVar[type[TunerConfig]]
    mergeable: ClassVar[bool] = False  # can fold its increments into the backbone weights
    identity_at_init: ClassVar[bool] = False  # output equals the untouched backbone's at step 0

    def __init__(self, config: C) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config_cls.name

    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Insert or wrap modules in place; return the module to train (usually `model` itself)."""

    def trainable_backbone_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """Existing backbone parameters that train besides the tuner's own: the classifier head by default."""
        get_classifier = getattr(model, "get_classifier", None)
        head = get_classifier() if callable(get_classifier) else None
        if not isinstance(head, nn.Module):
            raise TunerError(f"{self.name}: backbone has no classifier module to train")
        return head.parameters()

    def merge(self, root: nn.Module) -> None:
        """Fold the tuner's increments into the backbone weights (mergeable tuners only)."""
        for layer in self._mergeable_layers(root):
            layer.merge()

    def unmerge(self, root: nn.Module) -> None:
        """Undo `merge`."""
        for layer in self._mergeable_layers(root):
            layer.unmerge()

    def _mergeable_layers(self, root: nn.Module) -> list[MergeableLayer]:
        if not self.mergeable:
            raise TunerError(f"{self.name} is not mergeable")
        return [m for m in root.modules() if isinstance(m, MergeableLayer)]


@dataclass(frozen=True)
class TunedModel:
    """A backbone with a tuner attached, frozen structurally, with its parameter accounting."""

    module: nn.Module  # what to call and train
    backbone: nn.Module  # the timm model inside it
    tuner: Tuner[TunerConfig]
    params_total: int
    params_trainable: int
    params_added: int
    weights_frozen_bytes: int
    weights_trainable_bytes: int

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


def build_tuned_model(backbone: nn.Module, tuner: Tuner[TunerConfig]) -> TunedModel:
    """Attach `tuner` to `backbone`, freeze everything but the tuner's parameters (+ head), check invariants.

    Freezing is structural: parameters that did not exist before `attach` are the tuner's; nothing is chosen
    by name, so a backbone parameter whose name happens to contain 'lora' or 'head' cannot be caught.
    """
    original = list(backbone.parameters())
    original_ids = {id(p) for p in original}
    root = tuner.attach(backbone)
    params = list(root.parameters())
    param_ids = {id(p) for p in params}

    lost = [n for n, p in backbone.named_parameters() if id(p) not in param_ids]
    if len(lost) or not original_ids <= param_ids:
        raise TunerError(f"{tuner.name}: attach() dropped backbone parameters (e.g. {lost[:3]}); wrap, don't replace")
    patched = [name or "<root>" for name, m in root.named_modules() if "forward" in vars(m)]
    if patched:
        raise TunerError(f"{tuner.name}: modules with an instance-level forward (monkey-patched): {patched[:3]}")

    added = [p for p in params if id(p) not in original_ids]
    extra = list(tuner.trainable_backbone_parameters(backbone))
    foreign = [p for p in extra if id(p) not in original_ids]
    if foreign:
        raise TunerError(f"{tuner.name}: trainable_backbone_parameters() returned parameters not in the backbone")
    trainable_ids = {id(p) for p in added} | {id(p) for p in extra}
    for p in params:
        p.requires_grad_(id(p) in trainable_ids)
    if not trainable_ids:
        raise TunerError(f"{tuner.name}: no trainable parameters")

    def nbytes(ps: Iterable[torch.Tensor]) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    return TunedModel(
        module=root,
        backbone=backbone,
        tuner=tuner,
        params_total=sum(p.numel() for p in params),
        params_trainable=sum(p.numel() for p in trainable),
        params_added=sum(p.numel() for p in added),
        weights_frozen_bytes=nbytes(frozen) + nbytes(root.buffers()),
        weights_trainable_bytes=nbytes(trainable),
    )


def vit_blocks(model: nn.Module, tuner: str) -> nn.Sequential | nn.ModuleList:
    """The transformer blocks of a timm ViT-like model, or a TunerError naming what is missing."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise TunerError(f"{tuner}: backbone {type(model).__name__} has no `blocks`; expected a timm ViT")
    return blocks
