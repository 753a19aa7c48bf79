"""BitFit: which parameters train (every bias + the head, as OSU-MLB/PETL_Vision's `bias` rule), that forward and
bias gradients are the plain ViT's, and the parameter count on ViT-B/16."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from petlbench.backbone import build_backbone
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import TUNERS, describe_tuner, make_tuner
from petlbench.tuners.base import build_tuned_model
from tests.conftest import TINY_BACKBONE, TinyVitFactory
from tests.tuners import handwritten_vit as ref

Batch = tuple[torch.Tensor, torch.Tensor]


def official_bias_set(parts: ref.VitParts) -> list[torch.nn.Parameter]:
    """PETL_Vision's rule written out for a timm ViT: every parameter named *bias*, plus the new head."""
    params = [parts.patch.bias]
    for b in parts.blocks:
        params += [b.norm1.bias, b.qkv.bias, b.proj.bias, b.norm2.bias, b.fc1.bias, b.fc2.bias]
    return [*params, parts.norm.bias, parts.head.weight, parts.head.bias]


def test_handwritten_vit_matches_timm(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """The reference itself: with random biases it reproduces timm's logits (fp64, so any slip shows)."""
    model = tiny_vit().double().eval()
    parts = ref.capture(model)
    ref.randomize_([p for n, p in model.named_parameters() if n.endswith("bias")], seed=3)
    x = tiny_batch[0].double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.forward(parts, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_the_plain_vit(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, dtype: torch.dtype
) -> None:
    backbone = tiny_vit()
    parts = ref.capture(backbone)
    tuned = build_tuned_model(backbone, make_tuner("bitfit", {}))
    tuned.module.to(dtype).eval()
    trainable = tuned.trainable_parameters()
    expected = official_bias_set(parts)
    assert {id(p) for p in trainable} == {id(p) for p in expected}
    assert len(trainable) == len(expected)
    ref.randomize_(expected, seed=11)  # timm starts every bias at zero; random ones exercise every term
    x = tiny_batch[0].to(dtype)
    ref.assert_forward_and_grads_match(tuned.module(x), ref.forward(parts, x), expected, dtype)


def test_default_head_is_petl_visions_reset_classifier(tiny_vit: TinyVitFactory) -> None:
    """PETL_Vision (experiment/build_model.py) calls `model.reset_classifier(class_num)` after loading the weights;
    its timm (0.9.12, env_setup.sh) builds `nn.Linear(embed_dim, num_classes)` there and draws nothing else. With
    the same random state, BitFit's head is exactly that fresh nn.Linear (timm's own trunc-normal head is not)."""
    backbone = tiny_vit()
    built = backbone.head.weight.detach().clone()
    torch.manual_seed(7)
    tuned = build_tuned_model(backbone, make_tuner("bitfit", {}))
    torch.manual_seed(7)
    official = torch.nn.Linear(backbone.embed_dim, backbone.num_classes)  # what reset_classifier creates
    head = tuned.backbone.head
    assert tuned.tuner.head_init == "torch"
    assert torch.equal(head.weight, official.weight) and torch.equal(head.bias, official.bias)
    assert not torch.equal(head.weight, built)


def test_parameter_count_on_vit_b16() -> None:
    """Every bias of ViT-B/16 plus the 100-class head: D (patch) + L·(D + 3D + D + D + 4D + D) + D (final norm)."""
    d, layers, hidden, classes = 768, 12, 3072, 100
    biases = d + layers * (d + 3 * d + d + d + hidden + d) + d
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), classes)
    tuned = build_tuned_model(backbone, make_tuner("bitfit", {}))
    assert biases == 102_912
    assert tuned.params_trainable == biases + d * classes + classes == 179_812
    assert tuned.params_added == 0
    assert tuned.params_total == 85_798_656 + d * classes + classes


def test_only_existing_biases_train(tiny_vit: TinyVitFactory) -> None:
    """A backbone without qkv biases: BitFit trains what exists and adds nothing."""
    spec = TINY_BACKBONE.model_copy(update={"kwargs": {**TINY_BACKBONE.kwargs, "qkv_bias": False}})
    backbone = build_backbone(spec, 10)
    tuned = build_tuned_model(backbone, make_tuner("bitfit", {}))
    d, layers, hidden, classes = 64, 3, 192, 10
    assert tuned.params_trainable == d + layers * (d + d + d + hidden + d) + d + d * classes + classes
    names = {n for n, p in tuned.module.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in backbone.named_parameters() if n.endswith("bias") or n.startswith("head.")}


def test_knobs() -> None:
    # no knob of its own (the method is the choice of parameters): only the two every tuner has
    assert {row["name"] for row in describe_tuner(TUNERS["bitfit"])} == {"backbone_mode", "head_init"}
    assert make_tuner("bitfit", {}).knob_value() is None
    with pytest.raises(ValidationError, match="rank"):
        make_tuner("bitfit", {"rank": 8})
