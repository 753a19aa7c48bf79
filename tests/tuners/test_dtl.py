"""DTL / DTL+ (docs/methods.md, "DTL"): the official forward, parameter formula, where backward runs."""

from __future__ import annotations

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
from petlbench.tuners.dtl import Dtl
from petlbench.tuners.dtl.layers import DtlModel
from tests.conftest import TINY_CLASSES, TinyVitFactory

DEPTH, DIM, GRID = 3, 64, 4  # the tiny ViT: 3 blocks, width 64, 4x4 patches + class token


def dtl(backbone: nn.Module, seed: int = 1, **params: Any) -> TunedModel:
    torch.manual_seed(seed)
    return build_tuned_model(backbone, make_tuner("dtl", params))


def root(tuned: TunedModel) -> DtlModel:
    assert isinstance(tuned.module, DtlModel)
    return tuned.module


def perturb(model: DtlModel, seed: int = 5) -> None:
    """B starts at zero (the CSN adds nothing at step 0): give every side map a non-zero B."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for side_map in model.csn:
            side_map.lora_B.copy_(torch.randn(side_map.lora_B.shape, generator=generator) * 0.3)


def official_logits(model: DtlModel, x: torch.Tensor, start: int, beta: float) -> torch.Tensor:
    """heekhero/DTL models/vision_transformer.py `VisionTransformer.forward`, written out for the tiny ViT.

    Side maps read every block input, the running sum is swished (x·sigmoid(βx)) and added after blocks
    start..L-1; DTL+ convolves the swished patch tokens (the class token passes) with the depthwise conv;
    head = Linear(norm(mean of patch tokens)).
    """
    vit: Any = model.backbone
    b = x.shape[0]
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    residuals: Any = 0.0
    for bid, block in enumerate(vit.blocks):
        lora = model.csn[bid]
        residuals = residuals + t @ lora.lora_A.T @ lora.lora_B.T
        t = block(t)
        if bid >= start:
            act = residuals * torch.sigmoid(residuals * beta)
            if model.fusion is not None:
                patches = act[:, 1:].reshape(b, GRID, GRID, DIM).permute(0, 3, 1, 2)
                fused = F.conv2d(patches, model.fusion.weight, padding="same", groups=DIM)
                act = torch.cat([act[:, :1], fused.permute(0, 2, 3, 1).reshape(b, GRID * GRID, DIM)], dim=1)
            t = t + act
    pooled = t[:, 1:].mean(dim=1)
    pooled = F.layer_norm(pooled, (DIM,), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    return F.linear(pooled, vit.head.weight, vit.head.bias)


# -- 1. against the official computation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fusion_size", "start", "fused_attn"), [(0, None, True), (0, 0, False), (3, None, False), (4, 2, True)]
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_forward_and_gradients_match_the_official_forward(
    tiny_vit: TinyVitFactory, fusion_size: int, start: int | None, fused_attn: bool, dtype: torch.dtype, tol: float
) -> None:
    beta = 3.0  # the official 100 makes swish a ReLU at these scales; a small β exercises the sigmoid too
    tuned = dtl(tiny_vit(fused_attn=fused_attn), fusion_size=fusion_size, start=start, beta=beta)
    model = root(tuned).to(dtype).train()
    perturb(model)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 32, 32, generator=generator, dtype=dtype)
    y = torch.randint(TINY_CLASSES, (3,), generator=generator)
    params = tuned.trainable_parameters()
    assert len(params) == 2 * DEPTH + 2 + (fusion_size > 0)

    ours = model(x)
    expected = official_logits(model, x, DEPTH // 2 if start is None else start, beta)
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)
    grads = torch.autograd.grad(F.cross_entropy(ours, y), params)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, y), params)
    for g, e in zip(grads, expected_grads, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_side_network_adds_nothing_at_init_but_the_readout_is_dtls(tiny_vit: TinyVitFactory) -> None:
    """B = 0: every block output is the backbone's; the logits are the official mean-of-patches readout."""
    backbone = tiny_vit()
    model = root(dtl(backbone)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blocks_out = backbone.blocks(backbone._pos_embed(backbone.patch_embed(x)))  # the untouched blocks
        expected = backbone.head(backbone.norm(blocks_out[:, 1:].mean(dim=1)))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        tokens = backbone.norm(blocks_out)
        assert not torch.allclose(model(x), backbone.head(tokens[:, 0]))  # not the class-token readout


def test_default_start_is_half_the_depth() -> None:
    with torch.device("meta"):
        model = root(build_tuned_model(build_backbone(BackboneSpec(), 100), make_tuner("dtl", {})))
    assert model.start == 6  # ViT-B/16: side state added after blocks 6..11, the official VTAB setting


# -- 2. parameters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"), [({}, 113_764), ({"fusion_size": 3}, 120_676), ({"rank": 8, "fusion_size": 5}, 243_556)]
)
def test_trainable_parameters_on_vit_b(params: dict[str, Any], expected: int) -> None:
    """L·2·r·D side maps + D·k² depthwise conv (DTL+) + the head C·D + C; ViT-B/16, 100 classes."""
    with torch.device("meta"):
        tuned = build_tuned_model(build_backbone(BackboneSpec(), 100), make_tuner("dtl", params))
    d, depth, c = 768, 12, 100
    rank, k = params.get("rank", 2), params.get("fusion_size", 0)
    assert tuned.params_trainable == expected == depth * 2 * rank * d + d * k * k + c * d + c
    assert tuned.params_added == expected - (c * d + c)
    assert tuned.tuner.method() == ("dtl+" if k else "dtl")


# -- 3. where backward runs -------------------------------------------------------------------------------------------


def saved_per_block(model: DtlModel, x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Bytes autograd saves while inside each frozen block (weights excluded), and the loss."""
    inside: list[int | None] = [None]
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: inside.__setitem__(0, i)))
        hooks.append(blk.register_forward_hook(lambda m, a, out: inside.__setitem__(0, None)))
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    per_block = [0] * DEPTH

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] is not None and t.untyped_storage().data_ptr() not in weights:
            per_block[inside[0]] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    return per_block, loss


@pytest.mark.parametrize("start", [0, 1, 2])
def test_blocks_up_to_start_keep_nothing_and_later_blocks_are_backpropagated(
    tiny_vit: TinyVitFactory, tiny_batch: tuple[torch.Tensor, torch.Tensor], start: int
) -> None:
    model = root(dtl(tiny_vit(), start=start)).train()
    perturb(model)
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: outputs.append(out)) for blk in model.blocks]
    per_block, loss = saved_per_block(model, *tiny_batch)
    for h in hooks:
        h.remove()
    assert [out.requires_grad for out in outputs] == [i > start for i in range(DEPTH)]
    assert [n > 0 for n in per_block] == [i > start for i in range(DEPTH)]
    loss.backward()
    assert all(p.grad is None for p in model.backbone.blocks.parameters())
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in model.csn)


def test_backbone_grad_checkpointing_covers_the_backpropagated_blocks(
    tiny_vit: TinyVitFactory, tiny_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    plain = root(dtl(tiny_vit(), start=0)).train()
    ckpt = root(dtl(tiny_vit(), start=0)).train()
    perturb(plain)
    perturb(ckpt)
    ckpt.backbone.set_grad_checkpointing(True)
    saved_plain, loss_plain = saved_per_block(plain, *tiny_batch)
    saved_ckpt, loss_ckpt = saved_per_block(ckpt, *tiny_batch)
    assert sum(saved_ckpt) < sum(saved_plain) / 4  # checkpointed blocks keep (about) their input only
    torch.testing.assert_close(loss_ckpt, loss_plain)
    loss_plain.backward()
    loss_ckpt.backward()
    for a, b in zip(plain.csn.parameters(), ckpt.csn.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# -- 4. knobs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [{"rank": 0}, {"beta": 0.0}, {"fusion_size": -1}, {"fusion_size": 16}, {"start": -1}, {"M": 6}]
)
def test_config_rejects_bad_knobs(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Dtl.model_validate(bad)


@pytest.mark.parametrize(
    ("params", "message"),
    [({"start": 3}, r"tuner\.start 3 is not a block of this 3-block ViT; choose 0\.\.2"), ({"rank": 65}, "rank 65")],
)
def test_model_dependent_knobs_are_checked(tiny_vit: TinyVitFactory, params: dict[str, Any], message: str) -> None:
    with pytest.raises(TunerError, match=message):
        dtl(tiny_vit(), **params)
