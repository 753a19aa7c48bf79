"""The one model builder: a timm backbone with its tuner attached, as the worker, the estimator, the reference
loop and the configuration probe all build it."""

from __future__ import annotations

import torch

from petlbench.backbone import build_backbone
from petlbench.errors import ConfigError
from petlbench.spec.models import RunSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model


def build_model(spec: RunSpec, classes: int, device: torch.device | None = None) -> TunedModel:
    """Backbone + tuner, seeded so the same spec builds the same weights; moved to `device` if given.

    Called under `torch.device("meta")` it builds without allocating (the estimator does this).
    """
    torch.manual_seed(spec.seed)
    backbone = build_backbone(spec.backbone, classes)
    if spec.grad_checkpointing:
        set_grad_checkpointing = getattr(backbone, "set_grad_checkpointing", None)
        if not callable(set_grad_checkpointing):
            raise ConfigError(f"grad_checkpointing: {spec.backbone.model} does not support it; set it to false")
        set_grad_checkpointing(True)
    tuned = build_tuned_model(backbone, make_tuner(spec.tuner, spec.tuner_params))
    if device is not None:
        tuned.module.to(device)
    return tuned


def model_img_size(model: torch.nn.Module, fallback: int | None) -> int:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, tuple | list) and size:
        return int(size[0])
    if isinstance(size, int):
        return size
    return fallback or 224
