"""SSF: forward and gradients against the official ViT's scale-and-shift positions written out, the merge algebra
(fold, exact undo, partial folds), the init, the parameter count on ViT-B/16 and the knob errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from tests.conftest import TINY_BACKBONE, TinyVitFactory
from tests.tuners import handwritten_vit as ref

Batch = tuple[torch.Tensor, torch.Tensor]

# the official positions (dongzelian/SSF models/vision_transformer.py) as paths of the wrapped modules
BLOCK_POSITIONS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
TAP_OF = {
    "norm1": "norm1",
    "attn.qkv": "qkv",
    "attn.proj": "proj",
    "norm2": "norm2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}


def attach(tiny_vit: TinyVitFactory, **params: object) -> tuple[TunedModel, ref.VitParts]:
    backbone = tiny_vit()
    parts = ref.capture(backbone)
    torch.manual_seed(1)
    return build_tuned_model(backbone, make_tuner("ssf", params)), parts


def scale_shift(tuned: TunedModel, path: str) -> tuple[nn.Parameter, nn.Parameter]:
    params = dict(tuned.module.named_parameters())
    return params[f"{path}.scale"], params[f"{path}.shift"]


def all_positions(depth: int) -> list[str]:
    return ["patch_embed.proj", *(f"blocks.{i}.{p}" for i in range(depth) for p in BLOCK_POSITIONS), "norm"]


def spread(tuned: TunedModel, seed: int) -> None:
    """γ = 1 + 0.3·noise, β = 0.3·noise: far from the N(1, 0.02) init, so every term matters."""
    gammas = [p for n, p in tuned.module.named_parameters() if n.endswith(".scale")]
    betas = [p for n, p in tuned.module.named_parameters() if n.endswith(".shift")]
    ref.randomize_(gammas + betas, seed=seed, std=0.3)
    with torch.no_grad():
        for g in gammas:
            g.add_(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_the_official_vit(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, dtype: torch.dtype
) -> None:
    """ssf_ada(x, γ, β) = x·γ + β after patch_embed (flattened tokens), norm1, qkv, proj, norm2, fc1, fc2, norm."""
    tuned, parts = attach(tiny_vit)
    tuned.module.to(dtype).eval()
    spread(tuned, seed=6)
    depth = len(parts.blocks)

    def ssf_ada(path: str) -> ref.Tap:
        def tap(index: int, x: torch.Tensor) -> torch.Tensor:
            gamma, beta = scale_shift(tuned, path if index < 0 else f"blocks.{index}.{path}")
            return x * gamma + beta

        return tap

    taps = {"patch": ssf_ada("patch_embed.proj"), "norm": ssf_ada("norm")}
    taps |= {tap: ssf_ada(path) for path, tap in TAP_OF.items()}
    x = tiny_batch[0].to(dtype)
    trainable = tuned.trainable_parameters()
    ssf = [p for path in all_positions(depth) for p in scale_shift(tuned, path)]
    assert {id(p) for p in trainable} == {id(p) for p in ssf} | {id(parts.head.weight), id(parts.head.bias)}
    ref.assert_forward_and_grads_match(tuned.module(x), ref.forward(parts, x, taps=taps), trainable, dtype)


def test_init_follows_the_official_distribution(tiny_vit: TinyVitFactory) -> None:
    """init_ssf_scale_shift: γ ~ N(1, 0.02), β ~ N(0, 0.02); 2048 draws of each on the tiny ViT."""
    tuned, _ = attach(tiny_vit)
    gamma = torch.cat([p.flatten() for n, p in tuned.module.named_parameters() if n.endswith(".scale")])
    beta = torch.cat([p.flatten() for n, p in tuned.module.named_parameters() if n.endswith(".shift")])
    assert gamma.numel() == beta.numel() == 64 + 3 * (7 * 64 + 192) + 64
    assert abs(gamma.mean().item() - 1.0) < 0.003 and abs(gamma.std().item() - 0.02) < 0.002
    assert abs(beta.mean().item()) < 0.003 and abs(beta.std().item() - 0.02) < 0.002


def test_zero_init_std_is_the_identity(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    tuned, _ = attach(tiny_vit, init_std=0.0)
    tuned.module.eval()
    x = tiny_batch[0]
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), tiny_vit().eval()(x), rtol=0, atol=1e-6)


def test_merge_folds_into_weights_and_biases(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """After merge: W = diag(γ)·W0 and b = γ⊙b0 + β for every Linear/Conv/LayerNorm; the merged model ignores γ, β;
    unmerge restores W0 and b0. fp64, so the folded model must agree to 1e-10."""
    tuned, parts = attach(tiny_vit)
    tuned.module.double().eval()
    spread(tuned, seed=8)
    ref.randomize_([p for n, p in tuned.backbone.named_parameters() if n.endswith("bias")], seed=12)
    originals = {n: p.detach().clone() for n, p in tuned.backbone.named_parameters()}
    x = tiny_batch[0].double()
    with torch.no_grad():
        unmerged = tuned.module(x)
        tuned.tuner.merge(tuned.module)
        tuned.tuner.merge(tuned.module)  # idempotent
        params = dict(tuned.module.named_parameters())
        for path in all_positions(len(parts.blocks)):
            gamma, beta = scale_shift(tuned, path)
            w0, b0 = originals[f"{path}.base.weight"], originals[f"{path}.base.bias"]
            expected_w = w0 * gamma.view(-1, *([1] * (w0.dim() - 1)))
            torch.testing.assert_close(params[f"{path}.base.weight"], expected_w, rtol=0, atol=1e-14, msg=path)
            torch.testing.assert_close(params[f"{path}.base.bias"], gamma * b0 + beta, rtol=0, atol=1e-14, msg=path)
        merged = tuned.module(x)
        for n, p in tuned.module.named_parameters():  # merged: γ and β are no longer read
            if n.endswith((".scale", ".shift")):
                p.mul_(7.0)
        assert torch.equal(tuned.module(x), merged)
        for n, p in tuned.module.named_parameters():
            if n.endswith((".scale", ".shift")):
                p.div_(7.0)
        tuned.tuner.unmerge(tuned.module)
        again = tuned.module(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, unmerged, rtol=1e-12, atol=1e-12)
    for n, p in tuned.backbone.named_parameters():
        torch.testing.assert_close(p, originals[n], rtol=1e-13, atol=1e-13, msg=n)


@pytest.mark.parametrize(
    "kwargs", [{"qkv_bias": False}, {"global_pool": "avg"}], ids=["linear-without-bias", "avg-pool-identity-norm"]
)
def test_partial_folds_keep_the_function(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, kwargs: dict[str, object]
) -> None:
    """A bias-free qkv folds γ and keeps adding β; an avg-pool model's final norm is an Identity, whose SSF stays
    applied (the official code scales/shifts the un-normed tokens there too)."""
    spec = TINY_BACKBONE.model_copy(update={"kwargs": {**TINY_BACKBONE.kwargs, **kwargs}})
    torch.manual_seed(0)
    tuned = build_tuned_model(build_backbone(spec, 10), make_tuner("ssf", {}))
    tuned.module.double().eval()
    spread(tuned, seed=3)
    x = tiny_batch[0].double()
    with torch.no_grad():
        unmerged = tuned.module(x)
        tuned.tuner.merge(tuned.module)
        merged = tuned.module(x)
        tuned.tuner.unmerge(tuned.module)
        again = tuned.module(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, unmerged, rtol=1e-12, atol=1e-12)


def test_merge_refuses_a_zero_scale(tiny_vit: TinyVitFactory) -> None:
    tuned, _ = attach(tiny_vit)
    gamma, _ = scale_shift(tuned, "blocks.0.attn.qkv")
    with torch.no_grad():
        gamma[3] = 0.0
    with pytest.raises(TunerError, match=r"scale γ is exactly 0"):
        tuned.tuner.merge(tuned.module)


def test_parameter_count_on_vit_b16() -> None:
    """γ and β of D (patch) + L·(D + 3D + D + D + 4D + D) + D (final norm) channels, plus the 100-class head."""
    d, layers, hidden, classes = 768, 12, 3072, 100
    added = 2 * (d + layers * (d + 3 * d + d + d + hidden + d) + d)
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), classes)
    tuned = build_tuned_model(backbone, make_tuner("ssf", {}))
    assert added == 205_824
    assert tuned.params_added == added
    assert tuned.params_trainable == added + d * classes + classes


@pytest.mark.parametrize("bad", [{"init_std": -0.01}, {"rank": 8}, {"init_std": "wide"}])
def test_knob_bounds(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        make_tuner("ssf", bad)
    assert make_tuner("ssf", {}).knob_value() is None


def test_attaching_twice_is_refused(tiny_vit: TinyVitFactory) -> None:
    tuned, _ = attach(tiny_vit)
    with pytest.raises(TunerError, match="attach SSF once"):
        make_tuner("ssf", {}).attach(tuned.module)


def test_block_without_a_layernorm(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    backbone.blocks[2].norm2 = nn.Identity()
    with pytest.raises(TunerError, match=r"blocks\[2\]\.norm2 is Identity, expected a LayerNorm") as info:
        make_tuner("ssf", {}).attach(backbone)
    assert "\n" not in str(info.value)
    assert not any(n.endswith(".scale") for n, _ in backbone.named_parameters())  # nothing was wrapped
