"""Torch-side pieces every tuner may use: the mergeable-wrapper base, finding and wrapping a ViT's parts, and the
two common knobs applied by `build_tuned_model` (head init, backbone mode)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
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


def classifier_heads(model: nn.Module, tuner: str) -> list[nn.Module]:
    """The backbone's classifier head(s) from timm's `get_classifier()`, or a TunerError.

    Distilled DeiT models return two heads (`head`, `head_dist`) and average their logits; both are the new head.
    """
    get_classifier = getattr(model, "get_classifier", None)
    found = get_classifier() if callable(get_classifier) else None
    candidates = list(found) if isinstance(found, tuple | list) else [found]
    heads = [h for h in candidates if isinstance(h, nn.Module)]
    if not heads or len(heads) != len(candidates):
        raise TunerError(f"{tuner}: backbone {type(model).__name__} has no get_classifier() module to train")
    return heads


# VPT's classifier (KMnP/vpt src/models/mlp.py, `special_bias`): a bias that makes every class start at
# probability 0.01 under a sigmoid, -log((1 - 0.01) / 0.01) = -log(99)
VPT_HEAD_BIAS = -math.log(99.0)
# AdaptFormer's classifier (ShoufaChen/AdaptFormer main_image.py, "following MoCo v3"); timm's trunc_normal_ cuts at
# the absolute values ±2, i.e. 200 std away, so the draw is a plain normal in effect
ADAPTFORMER_HEAD_STD = 0.01


@torch.no_grad()
def init_heads(heads: Sequence[nn.Module], mode: str, tuner: str) -> None:
    """Re-initialise the new classifier(s) as `head_init` says ('torch' or 'vpt'; 'timm' is never re-drawn)."""
    for head in heads:
        if not isinstance(head, nn.Linear):
            if any(True for _ in head.parameters()):
                raise TunerError(
                    f"{tuner}: tuner.head_init {mode!r} needs an nn.Linear classifier, the backbone has "
                    f"{type(head).__name__}; use head_init 'timm'"
                )
            continue  # num_classes=0: an Identity, nothing to initialise
        if mode == "torch":  # what nn.Linear(in, C) starts with, so what timm 0.4.12's reset_classifier gave
            head.reset_parameters()
        elif mode == "adaptformer":  # main_image.py: the model's nn.Linear head, then trunc_normal_(weight, 0.01)
            head.reset_parameters()
            nn.init.trunc_normal_(head.weight, std=ADAPTFORMER_HEAD_STD, a=-2.0, b=2.0)
        elif mode == "vpt":
            nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
            if head.bias is not None:
                nn.init.constant_(head.bias, VPT_HEAD_BIAS)
        else:
            raise TunerError(f"{tuner}: unknown head_init {mode!r}; valid: timm, torch, vpt, adaptformer")


class EvalWhileTraining:
    """Forward pre-hook on the tuned root: in training mode, the given modules run in eval mode.

    `build_tuned_model` installs it for `backbone_mode='eval'` with every module the backbone had before the tuner
    was attached (the root excepted, so `root.training` keeps saying what the caller asked for). Only each
    module's own flag is cleared, not its children's: a tuner layer inside a backbone module (LoRA's wrapper in
    an attention block) and a wrapper around one (VPT's prompt blocks) keep training, dropout included.
    `eval()` and `train()` are left alone, so code that switches modes (inference measurement, evaluation
    during training) behaves as for any model; the flags are fixed when a training forward starts.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)

    def __call__(self, root: nn.Module, args: tuple[Any, ...]) -> None:
        if root.training:
            for module in self.modules:
                module.training = False


def keep_in_eval_while_training(root: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Make `modules` run in eval mode whenever `root` runs in training mode (see EvalWhileTraining)."""
    root.register_forward_pre_hook(EvalWhileTraining(modules))


def require_timm_block(block: nn.Module, index: int, tuner: str, method: str) -> None:
    """A TunerError unless `blocks[index]` runs timm's pre-norm `Block.forward`, which the wrapping tuners rebuild."""
    from timm.models.vision_transformer import Block

    if type(block).forward is not Block.forward:
        raise TunerError(
            f"{tuner}: blocks[{index}] is a {type(block).__name__}, whose forward is not timm's Block.forward; "
            f"{method} supports pre-norm timm ViT blocks"
        )


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


def unwrapped(module: object) -> object:
    """The module a chain of tuner wrappers holds (each keeps the module it wraps as `base`), or `module` itself."""
    seen = 0
    while isinstance(module, nn.Module) and isinstance(getattr(module, "base", None), nn.Module) and seen < 16:
        module, seen = module.base, seen + 1
    return module


def read_block_linear(block: nn.Module, path: str, index: int, tuner: str) -> nn.Linear:
    """The nn.Linear at `blocks[index].<path>`, looking through wrappers another tuner of a composition put there
    (`mlp` → AdapterMlp.base.fc2, `fc2` → FactLinear.base): for reading a width, never for wrapping."""
    found: object = block
    for part in path.split("."):
        direct = getattr(found, part, None)
        found = direct if direct is not None else getattr(unwrapped(found), part, None)
    found = unwrapped(found)
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


def single_head(model: nn.Module, tuner: str) -> nn.Module:
    """The backbone's one classifier head; a TunerError for a model with two (a distilled DeiT's `head_dist`)."""
    heads = classifier_heads(model, tuner)
    if len(heads) != 1:
        raise TunerError(
            f"{tuner}: backbone {type(model).__name__} has {len(heads)} classifier heads (a distilled DeiT); "
            f"{tuner} feeds one head from its own features: use the model without a distillation head"
        )
    return heads[0]
