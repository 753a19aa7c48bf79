"""Adapter (NOAH's baseline): forward and gradients against NOAH's block computation written out, init, dropout,
the parameter count on ViT-B/16 and the knob errors."""

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
    return build_tuned_model(backbone, make_tuner("adapter", params)), parts


def adapter_params(tuned: TunedModel, i: int) -> dict[str, nn.Parameter]:
    """blocks[i]'s adapter tensors: down (r×D), its bias, up (D×r), its bias."""
    prefix = f"blocks.{i}.mlp.adapter."
    params = dict(tuned.module.named_parameters())
    return {k: params[prefix + k] for k in ("down.weight", "down.bias", "up.weight", "up.bias")}


def noah_adapter(p: dict[str, nn.Parameter], h: torch.Tensor) -> torch.Tensor:
    """NOAH's AdapterSuper.forward with dropout 0: identity + ln2(QuickGELU(ln1(h)))."""
    z = h @ p["down.weight"].T + p["down.bias"]
    z = z * torch.sigmoid(1.702 * z)
    return h + z @ p["up.weight"].T + p["up.bias"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_noah(tiny_vit: TinyVitFactory, tiny_batch: Batch, dtype: torch.dtype) -> None:
    """NOAH's block: x' + A(MLP(LN2(x'))), the adapter after the MLP (and its dropout), before the residual add."""
    tuned, parts = attach(tiny_vit, bottleneck=5)
    tuned.module.to(dtype).eval()
    adapters = [adapter_params(tuned, i) for i in range(len(parts.blocks))]
    ref.randomize_([p for a in adapters for p in a.values()], seed=2)  # biases start at zero: make them count

    def branch(i: int, x_mid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return noah_adapter(adapters[i], h)

    x = tiny_batch[0].to(dtype)
    trainable = tuned.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for a in adapters for p in a.values()} | {
        id(parts.head.weight),
        id(parts.head.bias),
    }
    ref.assert_forward_and_grads_match(tuned.module(x), ref.forward(parts, x, mlp_branch=branch), trainable, dtype)


def noah_adapter_init(dim: int, reduction: int) -> list[torch.Tensor]:
    """NOAH's construction order, re-implemented: AdapterSuper builds ln1 (D→r) and ln2 (r→D), draws Xavier weights
    and N(0, 1e-6) biases (`AdapterSuper.init_weights`); then `VisionTransformer.__init__` calls `init_weights`,
    whose `self.apply(_init_vit_weights)` re-draws every nn.Linear of the model (no name is passed, so none counts
    as the head) with timm's trunc_normal_(std=.02), cut at ±2, and a zero bias. Returns down/up weights and biases."""
    ln1, ln2 = nn.Linear(dim, reduction), nn.Linear(reduction, dim)
    with torch.no_grad():
        for m in (ln1, ln2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)
        for m in (ln1, ln2):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)
    return [ln1.weight, ln1.bias, ln2.weight, ln2.bias]


def test_default_init_is_what_noahs_model_wide_init_leaves(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """Same distributions as NOAH's construction order: both weights N(0, 0.02²) in effect, both biases zero.
    (The Xavier draw petlbench used before has std √(2/(D + r)) = 0.158 here, far outside the bounds below.)"""
    tuned, _ = attach(tiny_vit, bottleneck=16)
    torch.manual_seed(3)
    official = noah_adapter_init(64, 16)
    for i in range(len(tiny_vit().blocks)):
        p = adapter_params(tuned, i)
        ours = [p["down.weight"], p["down.bias"], p["up.weight"], p["up.bias"]]
        for got, want in zip(ours, official, strict=True):
            assert got.shape == want.shape
            if want.abs().max() == 0:  # the biases
                assert got.abs().max() == 0
                continue
            # 1,024 draws each: the sample std is within 5 % of the true one with overwhelming probability
            assert abs(got.std().item() / want.std().item() - 1) < 0.12
            assert abs(got.mean().item()) < 0.003 and got.abs().max() < 6 * 0.02
    x = tiny_batch[0]
    tuned.module.eval()
    with torch.no_grad():  # tiny_vit() with the same seed is the untouched backbone: NOAH's init is no identity
        assert not torch.allclose(tuned.module(x), tiny_vit().eval()(x), atol=1e-4)


def test_default_dropout_is_noahs(tiny_vit: TinyVitFactory) -> None:
    """NOAH's supernet_train_prompt.py: `--drop_rate_adapter` defaults to 0.1, and the VTAB Adapter script
    (configs/Adapter/VTAB/slurm_train_adapter_vtab.sh) does not set it."""
    tuner = make_tuner("adapter", {})
    assert (tuner.dropout, tuner.init, tuner.bottleneck) == (0.1, "noah", 8)
    tuned = build_tuned_model(tiny_vit(), tuner)
    drops = [m for n, m in tuned.module.named_modules() if n.endswith("adapter.dropout")]
    assert len(drops) == len(tiny_vit().blocks) and all(isinstance(d, nn.Dropout) and d.p == 0.1 for d in drops)


def test_xavier_init_is_not_the_identity(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    tuned, _ = attach(tiny_vit, bottleneck=16, init="xavier")
    p = adapter_params(tuned, 0)
    bound = math.sqrt(6 / (64 + 16))  # Xavier-uniform, fan_in + fan_out = D + r
    for key in ("down.weight", "up.weight"):
        assert p[key].abs().max() <= bound
        assert p[key].abs().max() > 0.8 * bound  # a uniform draw of 1024 values reaches near the bound
    for key in ("down.bias", "up.bias"):
        assert 0 < p[key].abs().max() < 1e-5  # N(0, 1e-6)
    x = tiny_batch[0]
    tuned.module.eval()
    with torch.no_grad():  # tiny_vit() with the same seed is the untouched backbone
        assert not torch.allclose(tuned.module(x), tiny_vit().eval()(x), atol=1e-4)


def test_zero_init_is_the_identity(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    tuned, _ = attach(tiny_vit, init="zero")
    p = adapter_params(tuned, 1)
    assert torch.count_nonzero(p["up.weight"]) == 0 and torch.count_nonzero(p["up.bias"]) == 0
    assert torch.count_nonzero(p["down.weight"]) > 0
    tuned.module.eval()
    x = tiny_batch[0]
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), tiny_vit().eval()(x), rtol=0, atol=1e-6)


def test_dropout_acts_on_the_adapter_path_in_train_mode(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    x = tiny_batch[0]
    noisy, _ = attach(tiny_vit, dropout=0.5)
    clean, _ = attach(tiny_vit, dropout=0.0)
    with torch.no_grad():
        noisy.module.eval()
        clean.module.eval()
        torch.testing.assert_close(noisy.module(x), clean.module(x), rtol=0, atol=0)
        noisy.module.train()
        assert not torch.allclose(noisy.module(x), clean.module(x), atol=1e-4)
    assert make_tuner("adapter", {"dropout": 0.3}).dropout_rates() == (0.3,)


@pytest.mark.parametrize("bottleneck", [8, 64])
def test_parameter_count_on_vit_b16(bottleneck: int) -> None:
    """NOAH: per block down (D·r + r) and up (r·D + D); L blocks; plus the 100-class head (0.16M at r = 8)."""
    d, layers, classes, r = 768, 12, 100, bottleneck
    added = layers * (d * r + r + r * d + d)
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), classes)
    tuned = build_tuned_model(backbone, make_tuner("adapter", {"bottleneck": r}))
    assert tuned.params_added == added
    assert tuned.params_trainable == added + d * classes + classes
    if r == 8:
        assert added == 156_768


@pytest.mark.parametrize(
    "bad", [{"bottleneck": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"init": "kaiming"}, {"scale": 0.1}]
)
def test_knob_bounds(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        make_tuner("adapter", bad)


def test_knob_value_is_the_bottleneck() -> None:
    assert make_tuner("adapter", {"bottleneck": 16}).knob_value() == 16.0


def test_bottleneck_wider_than_the_model(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    with pytest.raises(TunerError, match=r"tuner\.bottleneck 65 exceeds the embedding width 64; choose") as info:
        build_tuned_model(backbone, make_tuner("adapter", {"bottleneck": 65}))
    assert "\n" not in str(info.value)
    assert not any("adapter" in n for n, _ in backbone.named_parameters())  # checked before any change


def test_attaching_twice_is_refused(tiny_vit: TinyVitFactory) -> None:
    tuned, _ = attach(tiny_vit)
    with pytest.raises(TunerError, match="attach the adapter once"):
        make_tuner("adapter", {}).attach(tuned.module)


def test_model_without_blocks() -> None:
    with pytest.raises(TunerError, match=r"has no `blocks`"):
        make_tuner("adapter", {}).attach(nn.Sequential(nn.Linear(4, 4)))
