"""AdaptFormer: forward and gradients against the official Block/Adapter computation written out (parallel and
sequential, every layernorm option, fixed and learnable scale), the 'lora' init, dropout, the parameter count on
ViT-B/16 and the knob errors."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from tests.conftest import TinyVitFactory
from tests.tuners import handwritten_vit as ref

Batch = tuple[torch.Tensor, torch.Tensor]


def attach(tiny_vit: TinyVitFactory, **params: object) -> tuple[TunedModel, ref.VitParts]:
    backbone = tiny_vit()
    parts = ref.capture(backbone)
    torch.manual_seed(1)
    return build_tuned_model(backbone, make_tuner("adaptformer", params)), parts


def adapter_params(tuned: TunedModel, i: int) -> dict[str, nn.Parameter]:
    """blocks[i]'s adapter tensors, by name below the adapter (down.*, up.*, norm.*, scale)."""
    prefix = f"blocks.{i}.adapter."
    return {n[len(prefix) :]: p for n, p in tuned.module.named_parameters() if n.startswith(prefix)}


def official_adapter(p: dict[str, nn.Parameter], x: torch.Tensor, scale: str, layernorm: str) -> torch.Tensor:
    """models/adapter.py `Adapter.forward(x, add_residual=False)` in eval mode (dropout off); `scale` as the
    official `adapter_scalar` string ('0.1' or 'learnable')."""

    def ln(t: torch.Tensor) -> torch.Tensor:  # nn.LayerNorm(n_embd): eps 1e-5
        return torch.nn.functional.layer_norm(t, t.shape[-1:], p["norm.weight"], p["norm.bias"], eps=1e-5)

    if layernorm == "in":
        x = ln(x)
    down = torch.relu(x @ p["down.weight"].T + p["down.bias"])
    up = (down @ p["up.weight"].T + p["up.bias"]) * (p["scale"] if scale == "learnable" else float(scale))
    return ln(up) if layernorm == "out" else up


CASES = [
    {"layernorm": "none", "mode": "parallel", "scale": 0.1},  # the official image setting
    {"layernorm": "in", "mode": "parallel", "scale": "learnable"},
    {"layernorm": "out", "mode": "sequential", "scale": 0.5},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['mode']}-{c['layernorm']}-{c['scale']}")
def test_forward_and_gradients_match_the_official_block(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, case: dict[str, object], dtype: torch.dtype
) -> None:
    """custom_modules.Block.forward: parallel adapts x' (the stream before norm2) and adds the result to the MLP
    output; sequential replaces the MLP output h by h + adapter(h). The residual x' is added last in both."""
    tuned, parts = attach(tiny_vit, bottleneck=6, dropout=0.0, **case)
    tuned.module.to(dtype).eval()
    adapters = [adapter_params(tuned, i) for i in range(len(parts.blocks))]
    ref.randomize_([p for a in adapters for p in a.values()], seed=4)  # up and both biases start at zero

    def branch(i: int, x_mid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        source = x_mid if case["mode"] == "parallel" else h
        return h + official_adapter(adapters[i], source, str(case["scale"]), str(case["layernorm"]))

    x = tiny_batch[0].to(dtype)
    trainable = tuned.trainable_parameters()
    expected = {id(p) for a in adapters for p in a.values()} | {id(parts.head.weight), id(parts.head.bias)}
    assert {id(p) for p in trainable} == expected
    ref.assert_forward_and_grads_match(tuned.module(x), ref.forward(parts, x, mlp_branch=branch), trainable, dtype)


def test_lora_init(tiny_vit: TinyVitFactory) -> None:
    """'lora': down Kaiming-uniform(a=√5), i.e. U(±1/√D); up weight and both biases zero; learnable s starts at 1."""
    tuned, _ = attach(tiny_vit, bottleneck=32, scale="learnable")
    p = adapter_params(tuned, 2)
    bound = 1 / math.sqrt(64)
    assert 0.8 * bound < p["down.weight"].abs().max() <= bound
    for key in ("up.weight", "up.bias", "down.bias"):
        assert torch.count_nonzero(p[key]) == 0, key
    assert p["scale"].tolist() == [1.0]


@pytest.mark.parametrize("case", [*CASES, {"layernorm": "in", "mode": "sequential", "scale": 0.1}])
def test_identity_at_init_for_every_option(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, case: dict[str, object]
) -> None:
    tuned, _ = attach(tiny_vit, **case)
    tuned.module.train()  # dropout on: the zero up-projection still gives exactly the backbone
    reference = tiny_vit().train()
    reference.head.load_state_dict(tuned.backbone.head.state_dict())  # the new head is not the adapters' delta
    x = tiny_batch[0]
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), reference(x), rtol=0, atol=1e-6)


def test_dropout_acts_on_the_bottleneck_in_train_mode(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    noisy, _ = attach(tiny_vit, dropout=0.5)
    clean, _ = attach(tiny_vit, dropout=0.0)
    for tuned in (noisy, clean):
        ref.randomize_([p for n, p in tuned.module.named_parameters() if ".adapter." in n], seed=9)
    x = tiny_batch[0]
    with torch.no_grad():
        noisy.module.eval()
        clean.module.eval()
        torch.testing.assert_close(noisy.module(x), clean.module(x), rtol=0, atol=0)
        noisy.module.train()
        assert not torch.allclose(noisy.module(x), clean.module(x), atol=1e-4)
    assert make_tuner("adaptformer", {}).dropout_rates() == (0.1,)


@pytest.mark.parametrize(
    ("params", "per_block_extra"),
    [({}, 0), ({"layernorm": "in"}, 2 * 768), ({"scale": "learnable"}, 1), ({"bottleneck": 8}, 0)],
)
def test_parameter_count_on_vit_b16(params: dict[str, object], per_block_extra: int) -> None:
    """Official Adapter: down (D·r + r) + up (r·D + D) per block, + 2D for its LayerNorm, + 1 for a learnable s."""
    d, layers, classes = 768, 12, 100
    r = int(str(params.get("bottleneck", 64)))
    added = layers * (d * r + r + r * d + d + per_block_extra)
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), classes)
    tuned = build_tuned_model(backbone, make_tuner("adaptformer", params))
    assert tuned.params_added == added
    assert tuned.params_trainable == added + d * classes + classes
    if not params:
        assert added == 1_189_632


@pytest.mark.parametrize(
    "bad",
    [
        {"bottleneck": 0},
        {"scale": 0.0},
        {"scale": -0.1},
        {"scale": "big"},
        {"dropout": 1.0},
        {"layernorm": "before"},
        {"mode": "both"},
        {"rank": 8},
    ],
)
def test_knob_bounds(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        make_tuner("adaptformer", bad)


def test_knob_value_and_defaults() -> None:
    tuner = make_tuner("adaptformer", {})
    assert tuner.knob_value() == 64.0
    assert tuner.model_dump() == {
        "bottleneck": 64,
        "scale": 0.1,
        "dropout": 0.1,
        "layernorm": "none",
        "mode": "parallel",
        "backbone_mode": "train",
        "head_init": "adaptformer",
    }


def test_default_head_is_main_images(tiny_vit: TinyVitFactory) -> None:
    """main_image.py, re-implemented: the model's head is a plain nn.Linear (vit_image.py leaves `init_weights`
    commented out), and after the checkpoint loads `trunc_normal_(model.head.weight, std=0.01)` re-draws its weight;
    the bias keeps nn.Linear's draw. Exact against that order from the same random state, and the default's
    distribution (timm's head, the previous default, has std 0.02 and a zero bias)."""
    from petlbench.tuners.layers import init_heads

    torch.manual_seed(4)
    official = nn.Linear(64, 10)
    with torch.no_grad():
        nn.init.trunc_normal_(official.weight, std=0.01, a=-2.0, b=2.0)  # timm's trunc_normal_ cuts at ±2
    head = nn.Linear(64, 10)
    torch.manual_seed(4)
    init_heads([head], "adaptformer", "adaptformer")
    assert torch.equal(head.weight, official.weight) and torch.equal(head.bias, official.bias)

    _, parts = attach(tiny_vit)
    weight, bias = parts.head.weight.detach(), parts.head.bias.detach()
    assert abs(weight.std().item() / 0.01 - 1) < 0.2  # 640 draws
    assert 0 < bias.abs().max() <= 1 / math.sqrt(64)  # nn.Linear's U(±1/√D)


def test_bottleneck_wider_than_the_model(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    with pytest.raises(TunerError, match=r"tuner\.bottleneck 65 exceeds the embedding width 64; choose") as info:
        build_tuned_model(backbone, make_tuner("adaptformer", {"bottleneck": 65}))
    assert "\n" not in str(info.value)
    assert not any("adapter" in n for n, _ in backbone.named_parameters())


def test_block_that_is_not_a_timm_block(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    backbone.blocks[1] = nn.Identity()
    with pytest.raises(TunerError, match=r"blocks\[1\] is a Identity, whose forward is not timm's Block\.forward"):
        make_tuner("adaptformer", {}).attach(backbone)
    assert not any("adapter" in n for n, _ in backbone.named_parameters())  # blocks[0] was left alone too


def test_attaching_twice_is_refused(tiny_vit: TinyVitFactory) -> None:
    tuned, _ = attach(tiny_vit)
    with pytest.raises(TunerError, match="attach AdaptFormer once"):
        make_tuner("adaptformer", {}).attach(tuned.module)
