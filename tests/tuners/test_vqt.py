"""VQT (docs/methods.md, "VQT"): the official concatenated computation, parameter formula, what backward keeps."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.vqt import Vqt
from petlbench.tuners.vqt.model import VqtModel
from tests.conftest import TINY_CLASSES, TinyVitFactory

DEPTH, DIM = 3, 64  # the tiny ViT (tests/conftest.py)


def vqt(backbone: nn.Module, seed: int = 1, **params: Any) -> TunedModel:
    torch.manual_seed(seed)
    return build_tuned_model(backbone, make_tuner("vqt", params))


def root(tuned: TunedModel) -> VqtModel:
    assert isinstance(tuned.module, VqtModel)
    return tuned.module


def official_logits(model: VqtModel, x: torch.Tensor) -> torch.Tensor:
    """The official Head2Toe/VQT forward (andytu28/VQT, src/models/vit_backbones/h2t_vit.py), written out.

    Queries are prepended to the block input; queries are computed for all tokens, keys/values for the image
    tokens only; the whole block (attention, residual, FFN) runs on the concatenation; the first n outputs are
    the layer's query outputs. Head input: [norm(x)[:, 0], q_1.view(B, -1), ...], each F.normalize'd, one Linear.
    """
    vit: Any = model.backbone
    b, n = x.shape[0], model.queries.shape[1]
    hidden = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    outputs = []
    for i, blk in enumerate(vit.blocks):
        hs = torch.cat([model.queries[i].expand(b, -1, -1), hidden], dim=1)
        heads, hd = blk.attn.num_heads, blk.attn.head_dim
        u = F.layer_norm(hs, (DIM,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        w, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
        q = F.linear(u, w[:DIM], bias[:DIM])
        k = F.linear(u[:, n:], w[DIM : 2 * DIM], bias[DIM : 2 * DIM])
        v = F.linear(u[:, n:], w[2 * DIM :], bias[2 * DIM :])
        q, k, v = (t.reshape(b, t.shape[1], heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, -1, DIM)
        hs = F.linear(ctx, blk.attn.proj.weight, blk.attn.proj.bias) + hs
        u = F.layer_norm(hs, (DIM,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        ffn = F.linear(F.gelu(F.linear(u, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        hs = ffn + hs
        outputs.append(hs[:, :n])
        hidden = hs[:, n:]
    encoded = F.layer_norm(hidden, (DIM,), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    feats = [F.normalize(f) for f in [encoded[:, 0], *(q.reshape(b, -1) for q in outputs)]]
    head = vit.get_classifier()
    weight = torch.cat([head.weight, model.query_head.weight], dim=1)  # the one official Linear
    return torch.cat(feats, dim=1) @ weight.T + head.bias


# -- 1. against the official computation ---------------------------------------------------------------------------


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_forward_and_gradients_match_the_official_concatenated_block(
    tiny_vit: TinyVitFactory, fused_attn: bool, dtype: torch.dtype, tol: float
) -> None:
    model = root(vqt(tiny_vit(fused_attn=fused_attn), num_queries=2, dropout=0.0)).to(dtype).train()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 32, 32, generator=generator, dtype=dtype)
    y = torch.randint(TINY_CLASSES, (3,), generator=generator)
    head = model.backbone.get_classifier()
    params = [model.queries, model.query_head.weight, head.weight, head.bias]

    ours = model(x)
    expected = official_logits(model, x)
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)
    grads = torch.autograd.grad(F.cross_entropy(ours, y), params)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, y), params)
    for name, g, e in zip(["queries", "query_head", "head.weight", "head.bias"], grads, expected_grads, strict=True):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=name)


def test_class_feature_is_the_untouched_backbones(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        backbone.eval()
        expected = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        model = root(vqt(backbone))
        _, cls = model.token_path(x)
    torch.testing.assert_close(cls, expected, rtol=0, atol=0)


def test_backbone_stays_in_eval_mode_while_the_query_dropout_trains(tiny_vit: TinyVitFactory) -> None:
    model = root(vqt(tiny_vit()))  # backbone_mode 'eval', VQT's default: a training forward runs it in eval
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = model(x)
    assert model.training and model.query_dropout.training
    assert not any(m.training for m in model.backbone.modules())
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))  # dropout on the queries is active
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_initialisation_follows_the_official_code(tiny_vit: TinyVitFactory) -> None:
    model = root(vqt(tiny_vit(), num_queries=4))
    bound = math.sqrt(6.0 / (3 * 8 * 8 + DIM))  # in_chans · patch² + D, patch 8
    assert model.queries.shape == (DEPTH, 4, DIM)
    assert model.queries.abs().max() <= bound and model.queries.abs().max() > 0.9 * bound
    head = model.backbone.get_classifier()
    torch.testing.assert_close(head.bias, torch.full_like(head.bias, -math.log(99.0)))
    both = torch.cat([head.weight, model.query_head.weight], dim=1)  # 10 x (64 + 3·4·64)
    assert model.query_head.in_features == DEPTH * 4 * DIM and model.query_head.bias is None
    assert abs(both.std().item() / math.sqrt(2.0 / TINY_CLASSES) - 1.0) < 0.1  # Kaiming normal, fan_out = C


# -- 2. parameters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [(1, 1_007_716), (10, 9_385_060), (20, 18_693_220)])
def test_trainable_parameters_on_vit_b(n: int, expected: int) -> None:
    """L·n·D queries + a head over D + L·n·D features (C·(D + L·n·D) + C), ViT-B/16 at 100 classes."""
    with torch.device("meta"):
        tuned = build_tuned_model(build_backbone(BackboneSpec(), 100), make_tuner("vqt", {"num_queries": n}))
    d, depth, c = 768, 12, 100
    assert tuned.params_trainable == expected == depth * n * d + c * (d + depth * n * d) + c
    assert tuned.params_added == depth * n * d + c * depth * n * d  # the backbone's head is reused, not added
    frozen = sum(p.numel() for p in tuned.backbone.parameters() if not p.requires_grad)
    assert frozen == 85_798_656


# -- 3. what backward keeps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_attn", [True, False])
def test_token_path_keeps_only_keys_and_values_for_backward(tiny_vit: TinyVitFactory, fused_attn: bool) -> None:
    model = root(vqt(tiny_vit(fused_attn=fused_attn), num_queries=2))
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(TINY_CLASSES, (4,))
    block_outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: block_outputs.append(out)) for blk in model.blocks]
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    assert len(block_outputs) == DEPTH and not any(out.requires_grad for out in block_outputs)
    token = 4 * 17 * DIM * 4  # one B x N x D fp32 token tensor (16 patches + class token)
    token_sized = [nbytes for nbytes in saved.values() if nbytes >= token]
    assert token_sized == [token] * (2 * DEPTH)  # K and V of every block, nothing else of the token path
    loss.backward()
    assert model.queries.grad is not None and all(model.queries.grad[i].abs().sum() > 0 for i in range(DEPTH))
    assert all(p.grad is None for p in model.backbone.blocks.parameters())


# -- 4. knobs and backbone checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"num_queries": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"queries": 2}])
def test_config_rejects_bad_knobs(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Vqt.model_validate(bad)


def test_rejects_a_backbone_without_timm_blocks(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    backbone.blocks[2] = nn.Identity()
    with pytest.raises(TunerError, match=r"vqt: blocks\[2\]"):
        vqt(backbone)


def test_rejects_a_non_linear_classifier(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    backbone.head = nn.Sequential(nn.Linear(DIM, TINY_CLASSES))
    with pytest.raises(TunerError, match="Linear head over 64 features"):
        vqt(backbone)
