"""Shared fixtures: a tiny timm ViT (CPU, milliseconds) built through petlbench's own backbone builder."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.spec.models import BackboneSpec

# timm's test_vit: embed 64, 2 heads, MLP ratio 3 (not 4: catches hard-coded ratios); 32 px, patch 8 → 16 patches.
TINY_BACKBONE = BackboneSpec(model="test_vit", img_size=32, kwargs={"patch_size": 8, "depth": 3})
TINY_CLASSES = 10

TinyVitFactory = Callable[..., nn.Module]


if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (`-n auto`): a second intra-op thread per worker would only oversubscribe the cores
    torch.set_num_threads(1)


@pytest.fixture
def tiny_vit() -> TinyVitFactory:
    """Build the tiny ViT: `tiny_vit(fused_attn=True, seed=0, num_classes=10)`; same seed → same weights."""

    def make(fused_attn: bool = True, seed: int = 0, num_classes: int = TINY_CLASSES) -> nn.Module:
        torch.manual_seed(seed)
        spec = TINY_BACKBONE.model_copy(update={"fused_attn": fused_attn})
        return build_backbone(spec, num_classes)

    return make


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=generator)
    y = torch.randint(TINY_CLASSES, (4,), generator=generator)
    return x, y
