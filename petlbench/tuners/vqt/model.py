"""VQT's layers: the frozen token pass that records each block's keys/values, the query pass, and the head.

Design choices (the official code and every deviation: docs/methods.md, "VQT"):

- **Two passes instead of one concatenated sequence.** The official block runs on `[P_i; Z_i]` with keys and
  values taken from `Z_i` only. Every operation of a pre-norm block except attention is per token, and the image
  tokens attend only to image tokens, so their outputs are those of the plain block on `Z_i`, and the query
  outputs are the block applied to `P_i` alone over the keys/values of `Z_i`. petlbench computes exactly that:
  the token pass runs the untouched blocks under `no_grad` (a forward hook on `attn.qkv` copies K_i, V_i out of
  the fused qkv output, as SQT does), and the query pass applies each frozen block query-only
  (`petlbench.tuners.sqt.model.knowledge_extraction`: `q` rows of qkv, the block's attention kernel following
  `attn.fused_attn`, proj, LayerScale, FFN). The test suite checks this against the concatenated computation.
- **Backbone in eval mode.** The official encoder overrides `train()` so that every backbone module stays in eval
  mode while VQT trains (only the query dropout is active): VQT's default `backbone_mode='eval'` does the same
  (the common knob, applied by `build_tuned_model`), so backbone dropout and drop path do not run under VQT.
- **One head over `[cls | q_1 | ... | q_L]`.** The official head is one Linear of width D + L·n·D with a single
  bias. The backbone's classifier (D inputs) keeps the class-token columns and the bias, and `query_head`
  (L·n·D inputs, no bias) holds the query columns: the sum of the two is that Linear. Both are initialised as
  the official head: Kaiming-normal with fan_out (std sqrt(2/C) for C classes) and bias -log((1-0.01)/0.01).
- The class-token feature is what the backbone's own head reads: final norm, pooling, `fc_norm`, `head_drop`
  (`forward_head(..., pre_logits=True)`), the class token for ViT-B/16.
- Queries are Uniform(-v, v) with v = sqrt(6 / (in_chans·p_h·p_w + D)) (v = 0.0625 for ViT-B/16); dropout
  draws an independent mask per sample, as the official code expands before dropping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.errors import TunerError
from petlbench.tuners.layers import single_head, vit_blocks
from petlbench.tuners.sqt.model import KV, KvCapture, TimmBlock, check_timm_block, knowledge_extraction


def query_init_bound(backbone: nn.Module, dim: int) -> float:
    """The official (VPT-style) Xavier bound sqrt(6 / (in_chans·p_h·p_w + D)) from the patch projection."""
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise TunerError("vqt: backbone has no patch_embed.proj convolution; expected a timm ViT")
    fan_in = proj.in_channels * math.prod(proj.kernel_size)
    return math.sqrt(6.0 / float(fan_in + dim))


class VqtModel(nn.Module):
    """The timm ViT (`backbone`, frozen token pass) plus VQT's query tokens and the query columns of the head."""

    def __init__(self, backbone: nn.Module, num_queries: int, dropout: float, normalize: bool) -> None:
        super().__init__()
        vit: Any = backbone  # timm's VisionTransformer (untyped)
        blocks = vit_blocks(backbone, "vqt")
        for i, blk in enumerate(blocks):
            check_timm_block(i, blk, "vqt")
        classifier = single_head(backbone, "vqt")
        dim, depth = int(vit.embed_dim), len(blocks)
        if not isinstance(classifier, nn.Linear) or classifier.in_features != dim:
            raise TunerError(
                f"vqt: the classifier is {type(classifier).__name__}; VQT needs a Linear head over {dim} features"
            )
        ref = next(backbone.parameters())
        factory: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype}

        self.backbone = backbone
        self.normalize = normalize
        self.queries = nn.Parameter(torch.empty(depth, num_queries, dim, **factory))
        bound = query_init_bound(backbone, dim)
        nn.init.uniform_(self.queries, -bound, bound)
        self.query_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.query_head = nn.Linear(depth * num_queries * dim, classifier.out_features, bias=False, **factory)
        # the official head is Kaiming-normal (fan_out) with a "special" bias: the classifier gets it from the
        # tuner's head_init ('vpt', applied by build_tuned_model), the query part of the head here
        with torch.no_grad():
            nn.init.kaiming_normal_(self.query_head.weight, a=0, mode="fan_out")

    @property
    def blocks(self) -> Sequence[TimmBlock]:
        return cast(Sequence[TimmBlock], self.backbone.blocks)

    def token_path(self, x: torch.Tensor) -> tuple[list[KV], torch.Tensor]:
        """The untouched ViT over the image tokens, without autograd: K_i, V_i of every block, and the
        class-token feature the backbone's head would read (B x D)."""
        m: Any = self.backbone
        kvs: list[KV] = []
        with torch.no_grad():
            t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            for blk in self.blocks:
                with KvCapture(blk.attn, "vqt") as recorder:
                    t = blk(t)
                kvs.append(recorder.result())
            cls: torch.Tensor = m.forward_head(m.norm(t), pre_logits=True)
        return kvs, cls

    def query_features(self, kvs: Sequence[KV], batch: int) -> list[torch.Tensor]:
        """Per block, its n query outputs flattened to B x (n·D)."""
        outs = []
        for i, (blk, (k, v)) in enumerate(zip(self.blocks, kvs, strict=True)):
            z = self.query_dropout(self.queries[i].expand(batch, -1, -1))
            h, _, _ = knowledge_extraction(blk, z, k, v)
            outs.append(h.reshape(batch, -1))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kvs, cls = self.token_path(x)
        queries = self.query_features(kvs, x.shape[0])
        if self.normalize:
            cls = F.normalize(cls, dim=1)
            queries = [F.normalize(q, dim=1) for q in queries]
        classifier: nn.Module = cast(Any, self.backbone).get_classifier()
        logits: torch.Tensor = classifier(cls) + self.query_head(torch.cat(queries, dim=1))
        return logits
