"""Behaviour every tuner in the registry must have, checked on a tiny timm ViT on CPU.

Parametrised over the registry itself, so a new tuner is covered the moment it is registered. The full contract
runs on the default tiny ViT; the other ViT families people fine-tune (registers + layer scale, no class token
with average pooling, CLIP-style pre-norm, distilled DeiT) get the checks that matter for them, or an expected
one-line refusal listed in REFUSALS.
"""

from __future__ import annotations

import copy
import math
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import petlbench.tuners as tuners_pkg
from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import TUNERS, make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.layers import classifier_heads
from tests.conftest import TINY_BACKBONE, TINY_CLASSES, TinyVitFactory

NAMES = sorted(TUNERS)

# Tiny members of the ViT families in use (32 px, patch 8, two blocks); timm's test_vit unless named.
_SMALL: dict[str, Any] = {"patch_size": 8, "depth": 2}
BACKBONES: dict[str, BackboneSpec] = {
    # DINOv2-style: 4 register tokens, LayerScale, positional embedding on the patches only
    "reg4-layerscale": TINY_BACKBONE.model_copy(
        update={"kwargs": {**_SMALL, "reg_tokens": 4, "init_values": 1e-5, "no_embed_class": True}}
    ),
    "avg-no-cls-token": TINY_BACKBONE.model_copy(
        update={"kwargs": {**_SMALL, "class_token": False, "global_pool": "avg"}}
    ),
    "clip-pre-norm": TINY_BACKBONE.model_copy(update={"kwargs": {**_SMALL, "pre_norm": True}}),
    # class + distillation token, two heads whose logits are averaged
    "deit-distilled": BackboneSpec(
        model="deit_tiny_distilled_patch16_224",
        img_size=32,
        kwargs={**_SMALL, "embed_dim": 64, "num_heads": 2},
    ),
}
# (tuner, backbone) → what its one-line TunerError must say. A tuner that cannot handle a backbone refuses in
# attach; listing it here is how the contract accepts that (an unexpected error, or no error, fails).
_TWO_HEADS = r"^{}: backbone VisionTransformerDistilled has 2 classifier heads \(a distilled DeiT\)"
REFUSALS: dict[tuple[str, str], str] = {
    # side networks that feed one head from their own features: a second (distillation) head has nothing to read
    (name, "deit-distilled"): _TWO_HEADS.format(name)
    for name in ("dtl", "lst", "vqt")
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a busy machine spinning OpenMP threads cost 10x (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def attach(tiny_vit: TinyVitFactory, name: str, fused_attn: bool = True, seed: int = 0) -> TunedModel:
    backbone = tiny_vit(fused_attn=fused_attn, seed=seed)
    torch.manual_seed(seed + 1)  # tuner init, independent of the backbone's
    return build_tuned_model(backbone, make_tuner(name, {}))


def perturb(tuned: TunedModel) -> None:
    """Give zero-initialised tuner parameters random values, so deltas are not trivially zero."""
    backbone_ids = {id(p) for p in tuned.backbone.parameters()}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.module.parameters():
            if id(p) not in backbone_ids:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def test_every_tuner_module_is_registered() -> None:
    """Each module (or package) in petlbench/tuners/ other than the plumbing holds a registered tuner."""
    plumbing = {"base", "layers"}
    modules = {m.name for m in pkgutil.iter_modules(tuners_pkg.__path__)} - plumbing
    registered = {TUNERS[name].__module__.split(".")[2] for name in TUNERS}
    assert modules == registered, f"unregistered tuner modules: {sorted(modules - registered)}"


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_no_instance_forward(tiny_vit: TinyVitFactory, name: str, tiny_batch) -> None:
    tuned = attach(tiny_vit, name)
    x, _ = tiny_batch
    assert tuned.module(x).shape == (len(x), TINY_CLASSES)
    patched = [n for n, m in tuned.module.named_modules() if "forward" in vars(m)]
    assert patched == []


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_trainable_parameters(tiny_vit: TinyVitFactory, name: str, tiny_batch) -> None:
    tuned = attach(tiny_vit, name)
    x, y = tiny_batch
    tuned.module.train()
    nn.functional.cross_entropy(tuned.module(x), y).backward()
    for pname, p in tuned.module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: trainable {pname} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {pname} got a gradient"


@pytest.mark.parametrize("name", NAMES)
def test_parameter_accounting(tiny_vit: TinyVitFactory, name: str) -> None:
    tuned = attach(tiny_vit, name)
    trainable = sum(p.numel() for p in tuned.module.parameters() if p.requires_grad)
    assert tuned.params_trainable == trainable
    assert tuned.params_total == sum(p.numel() for p in tuned.module.parameters())
    assert (tuned.params_added > 0) == TUNERS[name].adds_parameters


@pytest.mark.parametrize("name", [n for n in NAMES if TUNERS[n].identity_at_init])
def test_identity_at_init(tiny_vit: TinyVitFactory, name: str, tiny_batch) -> None:
    backbone = tiny_vit()
    reference = copy.deepcopy(backbone).eval()
    tuned = build_tuned_model(backbone, make_tuner(name, {}))
    tuned.module.eval()
    for ours, theirs in zip(classifier_heads(backbone, name), classifier_heads(reference, name), strict=True):
        theirs.load_state_dict(ours.state_dict())  # the new head's init (head_init) is not the tuner's delta
    x, _ = tiny_batch
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), reference(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if TUNERS[n].mergeable])
def test_merge_matches_unmerged_and_unmerge_restores(tiny_vit: TinyVitFactory, name: str, tiny_batch) -> None:
    tuned = attach(tiny_vit, name)
    perturb(tuned)
    tuned.module.eval()
    x, _ = tiny_batch
    before = {k: v.clone() for k, v in tuned.backbone.state_dict().items()}
    with torch.no_grad():
        unmerged = tuned.module(x)
        tuned.tuner.merge(tuned.module)
        merged = tuned.module(x)
        tuned.tuner.unmerge(tuned.module)
        again = tuned.module(x)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=1e-5)
    for key, value in tuned.backbone.state_dict().items():
        if key in before:
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_fused_attention_on_and_off_agree(tiny_vit: TinyVitFactory, name: str, tiny_batch) -> None:
    fused = attach(tiny_vit, name, fused_attn=True)
    plain = attach(tiny_vit, name, fused_attn=False)
    perturb(fused)
    perturb(plain)
    fused.module.eval()
    plain.module.eval()
    x, _ = tiny_batch
    with torch.no_grad():
        torch.testing.assert_close(fused.module(x), plain.module(x), rtol=1e-4, atol=1e-5)


def test_tuners_train_distinct_parameter_sets(tiny_vit: TinyVitFactory) -> None:
    """Two tuners that train the same parameters are the same method under two names (the V-PETL trap)."""
    seen: dict[frozenset[str], str] = {}
    for name in NAMES:
        tuned = attach(tiny_vit, name)
        trainable = frozenset(n for n, p in tuned.module.named_parameters() if p.requires_grad)
        assert trainable not in seen, f"{name} trains the same parameters as {seen.get(trainable)}"
        seen[trainable] = name


@pytest.mark.parametrize("name", NAMES)
def test_training_step_changes_only_trainable_parameters(tiny_vit: TinyVitFactory, name: str, tiny_batch) -> None:
    tuned = attach(tiny_vit, name)
    perturb(tuned)  # zero-init factors would otherwise keep their partners' gradients at zero
    frozen_before = {n: p.clone() for n, p in tuned.module.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.clone() for n, p in tuned.module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(tuned.trainable_parameters(), lr=0.1)
    x, y = tiny_batch
    tuned.module.train()
    nn.functional.cross_entropy(tuned.module(x), y).backward()
    optimizer.step()
    params = dict(tuned.module.named_parameters())
    for pname, value in frozen_before.items():
        assert torch.equal(params[pname], value), f"{name}: frozen {pname} changed"
    changed = [n for n, v in trainable_before.items() if not torch.equal(params[n], v)]
    assert changed, f"{name}: no trainable parameter changed after a step"


# -- the two common knobs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_backbone_mode_puts_only_the_backbone_in_eval(
    tiny_vit: TinyVitFactory, name: str, mode: str, tiny_batch
) -> None:
    """'eval': a training forward runs every module the backbone came with in eval mode, the tuner's in train."""
    backbone = tiny_vit()
    own = {id(m) for m in backbone.modules()}
    tuned = build_tuned_model(backbone, make_tuner(name, {"backbone_mode": mode}))
    root = tuned.module
    x, y = tiny_batch

    def flags() -> tuple[set[bool], set[bool]]:
        backbone_flags = {m.training for m in root.modules() if id(m) in own and m is not root}
        tuner_flags = {m.training for m in root.modules() if id(m) not in own}
        return backbone_flags, tuner_flags

    root.train()
    nn.functional.cross_entropy(root(x), y).backward()
    backbone_flags, tuner_flags = flags()
    assert root.training
    assert backbone_flags == ({False} if mode == "eval" else {True})
    assert tuner_flags <= {True}  # empty for tuners that add no module
    root.eval()
    with torch.no_grad():
        root(x)
    assert flags() == ({False}, {False} if tuner_flags else set())
    root.train()  # switching back still works: the next training forward pins the backbone again
    root(x)
    assert flags() == (backbone_flags, tuner_flags)


@pytest.mark.parametrize("name", NAMES)
def test_default_head_init_is_applied(tiny_vit: TinyVitFactory, name: str) -> None:
    """Each tuner's default head_init is what ends up in the head (values checked against each scheme's formula)."""
    backbone = tiny_vit()
    built = copy.deepcopy(backbone.get_classifier())
    tuned = build_tuned_model(backbone, make_tuner(name, {}))
    mode = tuned.tuner.head_init
    (head,) = classifier_heads(tuned.backbone, name)
    assert isinstance(head, nn.Linear) and head.bias is not None
    weight, bias = head.weight.detach(), head.bias.detach()
    if mode == "timm":  # not re-drawn: exactly the head timm built (truncated normal 0.02, zero bias)
        assert torch.equal(weight, built.weight) and torch.equal(bias, built.bias)
        assert bias.abs().max() == 0 and abs(weight.std().item() / 0.02 - 1) < 0.15
    elif mode == "torch":  # nn.Linear's default: U(±1/sqrt(fan_in)) for weight and bias
        bound = 1 / math.sqrt(head.in_features)
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        assert weight.abs().max() > 0.9 * bound and bias.abs().max() > 0
    elif mode == "adaptformer":  # nn.Linear's default bias, the weight re-drawn with std 0.01
        bound = 1 / math.sqrt(head.in_features)
        assert bias.abs().max() <= bound and bias.abs().max() > 0
        assert abs(weight.std().item() / 0.01 - 1) < 0.2
    else:  # vpt: Kaiming-normal over fan_out = classes, bias -log((1 - 0.01) / 0.01)
        assert mode == "vpt"
        torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99.0)))
        assert abs(weight.std().item() / math.sqrt(2 / head.out_features) - 1) < 0.15


# -- the ViT families -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone_id", sorted(BACKBONES))
@pytest.mark.parametrize("name", NAMES)
def test_works_on_other_vit_families_or_refuses_in_one_line(name: str, backbone_id: str) -> None:
    """Forward shape, gradients only to trainable parameters, a step changes only them, every head trains."""
    torch.manual_seed(0)
    backbone = build_backbone(BACKBONES[backbone_id], TINY_CLASSES)
    refusal = REFUSALS.get((name, backbone_id))
    if refusal is not None:
        with pytest.raises(TunerError, match=refusal) as caught:
            build_tuned_model(backbone, make_tuner(name, {}))
        assert "\n" not in str(caught.value)
        return
    tuned = build_tuned_model(backbone, make_tuner(name, {}))
    perturb(tuned)
    heads = classifier_heads(tuned.backbone, name)
    assert all(p.requires_grad for head in heads for p in head.parameters())
    model = tuned.module.train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    y = torch.randint(TINY_CLASSES, (2,), generator=generator)
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(tuned.trainable_parameters(), lr=0.1)
    logits = model(x)
    assert logits.shape == (2, TINY_CLASSES)
    nn.functional.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, f"{name} on {backbone_id}: {pname}"
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, f"{name} on {backbone_id}: {sorted(changed - trainable)[:3]}"
