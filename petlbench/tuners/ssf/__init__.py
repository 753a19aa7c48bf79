"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022; docs/methods.md, "SSF").

After chosen operations of the frozen ViT, every output channel c is scaled and shifted, y_c = γ_c·o_c + β_c,
with γ ~ N(1, 0.02) and β ~ N(0, 0.02) (official `init_ssf_scale_shift`). The positions are those of the official
ViT (dongzelian/SSF, `models/vision_transformer.py`): the patch-embedding projection; in every block norm1,
attn.qkv (all 3D outputs), attn.proj, norm2, mlp.fc1 and mlp.fc2; and the final norm. Only the γ/β pairs and the
new head train.

Every position follows a linear map with per-output-channel affine terms (a Linear, the patch Conv2d or a
LayerNorm's affine), so the whole tuner folds into the backbone: W ← diag(γ)·W, b ← γ⊙b + β (`merge`), and the
merged model runs at the backbone's own cost. A position whose layer lacks a bias (or a LayerNorm without affine)
folds what it can and keeps applying the rest; the official placement is kept either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from petlbench.tuners.base import Tuner

if TYPE_CHECKING:
    from torch import nn


class Ssf(Tuner):
    """Per-channel scale and shift after the patch embedding, every norm and Linear, and the final norm."""

    name = "ssf"
    brief = "scale and shift after each op"
    summary = (
        "SSF: γ⊙o + β after the patch embedding, norm1, qkv, proj, norm2, fc1, fc2 of every block and the final "
        "norm; γ ~ N(1, 0.02), β ~ N(0, 0.02); folds into the frozen weights (mergeable)."
    )
    mergeable = True
    replaces = (
        "patch_embed.proj",
        "patch_embed.norm",
        "blocks.norm1",
        "blocks.attn.qkv",
        "blocks.attn.proj",
        "blocks.norm2",
        "blocks.mlp.fc1",
        "blocks.mlp.fc2",
        "norm",
    )

    init_std: float = Field(0.02, ge=0.0, description="std of the N(1, std) scale and N(0, std) shift inits")

    def attach(self, model: nn.Module) -> nn.Module:
        from petlbench.tuners.ssf.layers import attach_ssf

        attach_ssf(model, self.init_std)
        return model
