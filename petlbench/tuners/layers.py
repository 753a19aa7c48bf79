"""Torch-side pieces every tuner may use: the mergeable-wrapper base, and finding and wrapping a ViT's parts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from torch import nn

from petlbench.errors import TunerError


class MergeableLayer(nn.Module, ABC):
    """A wrapper whose increment can be folded into the weights of the layer it wraps, and taken out again."""

    @abstractmethod
    def merge(self) -> None: ...

    @abstractmethod
    def unmerge(self) -> None: ...


def vit_blocks(model: nn.Module, tuner: str) -> nn.Sequential | nn.ModuleList:
    """The transformer blocks of a timm ViT-like model, or a TunerError naming what is missing."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise TunerError(f"{tuner}: backbone {type(model).__name__} has no `blocks`; expected a timm ViT")
    return blocks


def classifier(model: nn.Module, tuner: str) -> nn.Module:
    """The backbone's classifier head (timm's `get_classifier()`), or a TunerError."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Module):
        raise TunerError(f"{tuner}: backbone has no classifier module to train")
    return head


def block_linear(block: nn.Module, path: str, index: int, tuner: str) -> nn.Linear:
    """The nn.Linear at `blocks[index].<path>` (e.g. `attn.qkv`), or a TunerError naming what is there instead."""
    found: object = block
    for part in path.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, nn.Linear):
        raise TunerError(
            f"{tuner}: blocks[{index}].{path} is {type(found).__name__}, expected an nn.Linear (timm ViT block layout)"
        )
    return found


def wrap_block_linears(
    model: nn.Module,
    paths: Sequence[str],
    wrap: Callable[[int, str, nn.Linear], nn.Module],
    tuner: str,
) -> None:
    """Replace `blocks[i].<path>` by `wrap(i, path, linear)` for every block and path.

    Every target is found (and checked to be an nn.Linear) before anything is replaced, so a failure leaves the
    model as it was.
    """
    blocks = vit_blocks(model, tuner)
    targets = [
        (i, block, path, block_linear(block, path, i, tuner)) for i, block in enumerate(blocks) for path in paths
    ]
    for i, block, path, linear in targets:
        parent, _, name = path.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        owner.register_module(name, wrap(i, path, linear))
