"""FacT-TT / FacT-TK: exact parameter counts on ViT-B/16, the increment formulas of METHODS.md §2.3-2.4 (with
k = hidden/D slices, 3 on the tiny model), dropout placement and the attach-time errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.fact.layers import FactFactors, FactLinear
from tests.conftest import TINY_BACKBONE, TinyVitFactory

Batch = tuple[torch.Tensor, torch.Tensor]

HEAD_100 = 768 * 100 + 100  # 76,900: the new 100-class head of ViT-B/16


def attach(tiny_vit: TinyVitFactory, **params: object) -> TunedModel:
    backbone = tiny_vit()
    torch.manual_seed(1)
    return build_tuned_model(backbone, make_tuner("fact", params))


def randomize(tuned: TunedModel, seed: int = 7) -> None:
    """Random values for every trainable parameter (V starts at zero, which would hide every formula)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def factors_of(tuned: TunedModel) -> FactFactors:
    factors = tuned.module.get_submodule("fact")
    assert isinstance(factors, FactFactors)
    return factors


def blocks_of(tuned: TunedModel) -> list[nn.Module]:
    return list(tuned.module.get_submodule("blocks").children())


def wrapped(block: nn.Module) -> dict[str, FactLinear]:
    layers = {
        "qkv": block.get_submodule("attn.qkv"),
        "proj": block.get_submodule("attn.proj"),
        "fc1": block.get_submodule("mlp.fc1"),
        "fc2": block.get_submodule("mlp.fc2"),
    }
    assert all(isinstance(m, FactLinear) for m in layers.values())
    return layers  # type: ignore[return-value]


# -- exact parameter counts (METHODS.md §2.5, §6) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "rank", "trainable"),
    [
        ("tt", 8, 98_404),  # official CIFAR config
        ("tt", 16, 138_340),
        ("tk", 32, 163_428),  # official CIFAR config
        ("tt", 4, 8_448 + HEAD_100),  # the "8K" FacT of the abstract
        ("tk", 16, 30_976 + HEAD_100),
    ],
)
def test_parameter_counts_on_vit_b16(variant: str, rank: int, trainable: int) -> None:
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), 100)
    tuned = build_tuned_model(backbone, make_tuner("fact", {"variant": variant, "rank": rank}))
    assert tuned.params_trainable == trainable
    assert tuned.params_added == trainable - HEAD_100
    assert tuned.params_total == 85_798_656 + HEAD_100 + tuned.params_added
    if variant == "tk":
        assert tuple(factors_of(tuned).slice_factors.shape) == (rank, 144)  # type: ignore[union-attr]


def test_shared_factors_are_registered_once(tiny_vit: TinyVitFactory) -> None:
    tuned = attach(tiny_vit)
    factors = factors_of(tuned)
    names = [n for n, _ in tuned.module.named_parameters()]
    assert names.count("fact.u.weight") == 1 and names.count("fact.v.weight") == 1
    assert not any(n.endswith(("u.weight", "v.weight")) and not n.startswith("fact.") for n in names)
    for block in blocks_of(tuned):
        for layer in wrapped(block).values():
            assert layer.factors is factors
    clone = copy.deepcopy(tuned.module)  # a copy shares its own container, not the original's
    assert clone.blocks[0].attn.qkv.factors is clone.fact  # type: ignore[union-attr, index]
    assert clone.fact is not factors


# -- the increment formulas (METHODS.md §2.3-2.4) -----------------------------------------------------------------


def tt_increments(layers: dict[str, FactLinear], u: torch.Tensor, v: torch.Tensor, s: float) -> dict[str, torch.Tensor]:
    """§2.4 for TT, slice by slice: dW_j = s·V S_j U; fc1 row block c uses rows c of S_fc1, fc2 column block c
    uses columns c of S_fc2 (blocks of r)."""
    r = u.shape[0]
    k = layers["fc1"].out_chunks

    def one(core: torch.Tensor) -> torch.Tensor:
        return s * v @ core @ u

    qkv, proj, fc1, fc2 = (layers[n].core for n in ("qkv", "proj", "fc1", "fc2"))
    assert qkv is not None and proj is not None and fc1 is not None and fc2 is not None
    assert qkv.shape == (3 * r, r) and proj.shape == (r, r) and fc1.shape == (k * r, r) and fc2.shape == (r, k * r)
    return {
        "qkv": torch.cat([one(qkv[j * r : (j + 1) * r]) for j in range(3)], dim=0),  # rows [q | k | v]
        "proj": one(proj),
        "fc1": torch.cat([one(fc1[c * r : (c + 1) * r]) for c in range(k)], dim=0),
        "fc2": torch.cat([one(fc2[:, c * r : (c + 1) * r]) for c in range(k)], dim=1),
    }


def tk_increments(factors: FactFactors, block: int, k: int, s: float) -> dict[str, torch.Tensor]:
    """§2.2-2.4 for TK, written out index by index from C and P (no reshape of the implementation's)."""
    c_core, p = factors.core, factors.slice_factors
    assert c_core is not None and p is not None
    u, v, r = factors.u.weight, factors.v.weight, factors.rank
    first = block * (4 + 2 * k)  # block b owns columns first .. first + 4 + 2k - 1: q, k, v, o, fc1 ×k, fc2 ×k

    def slice_core(column: int) -> torch.Tensor:  # M = Σ_c C[:, :, c]·P[c, column]
        return sum((c_core[:, :, c] * p[c, column] for c in range(r)), torch.zeros(r, r))

    def flattened(columns: range) -> torch.Tensor:  # official G: G[a, b·k + j] = T[a, b, j], T[:, :, j] = M_j
        cores = [slice_core(col) for col in columns]
        g = torch.empty(r, k * r)
        for a in range(r):
            for b in range(r):
                for j in range(k):
                    g[a, b * k + j] = cores[j][a, b]
        return g

    attn = [s * v @ slice_core(first + j).t() @ u for j in range(4)]  # dW_j = s·V M_jᵀ U
    g1 = flattened(range(first + 4, first + 4 + k))
    g2 = flattened(range(first + 4 + k, first + 4 + 2 * k))
    return {
        "qkv": torch.cat(attn[:3], dim=0),
        "proj": attn[3],
        "fc1": torch.cat([s * v @ g1[:, c * r : (c + 1) * r].t() @ u for c in range(k)], dim=0),
        "fc2": torch.cat([s * v @ g2[:, c * r : (c + 1) * r] @ u for c in range(k)], dim=1),
    }


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_increments_match_the_formulas(tiny_vit: TinyVitFactory, variant: str) -> None:
    scale = 0.5
    tuned = attach(tiny_vit, variant=variant, rank=4, scale=scale, dropout=0.0)
    randomize(tuned)
    factors = factors_of(tuned)
    blocks = blocks_of(tuned)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        expected = {}
        for b, block in enumerate(blocks):
            layers = wrapped(block)
            k = layers["fc1"].out_chunks
            assert k == 3  # test_vit: MLP ratio 3, so the fc1/fc2 chunking is not hard-wired to 4
            if variant == "tt":
                expected[b] = tt_increments(layers, factors.u.weight, factors.v.weight, scale)
            else:
                expected[b] = tk_increments(factors, b, k, scale)
            for name, layer in layers.items():
                # forward (§2.3): the wrapper adds x·dWᵀ to the frozen output
                x = torch.randn(2, 5, layer.base.in_features, generator=generator)
                added = layer(x) - layer.base(x)
                torch.testing.assert_close(added, F.linear(x, expected[b][name]), atol=1e-5, rtol=1e-4, msg=name)

        before = {(b, n): m.base.weight.clone() for b, blk in enumerate(blocks) for n, m in wrapped(blk).items()}
        tuned.tuner.merge(tuned.module)
        for (b, name), weight in before.items():
            merged = wrapped(blocks[b])[name].base.weight
            torch.testing.assert_close(merged - weight, expected[b][name], atol=1e-5, rtol=1e-4, msg=f"{b}.{name}")


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_merge_unmerge_and_gradients(tiny_vit: TinyVitFactory, variant: str, tiny_batch: Batch) -> None:
    tuned = attach(tiny_vit, variant=variant, dropout=0.0)
    randomize(tuned)
    x, y = tiny_batch
    tuned.module.train()
    nn.functional.cross_entropy(tuned.module(x), y).backward()
    for name, p in tuned.module.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"  # type: ignore[union-attr]

    tuned.module.eval()
    weights = {k: v.clone() for k, v in tuned.backbone.state_dict().items()}
    with torch.no_grad():
        unmerged = tuned.module(x)
        tuned.tuner.merge(tuned.module)
        merged = tuned.module(x)
        tuned.tuner.merge(tuned.module)  # idempotent
        assert torch.equal(tuned.module(x), merged)
        tuned.tuner.unmerge(tuned.module)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    for key, value in tuned.backbone.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6, msg=key)


def test_tk_blocks_use_their_own_columns(tiny_vit: TinyVitFactory) -> None:
    """Zeroing one block's columns of P removes that block's increments and no other."""
    tuned = attach(tiny_vit, variant="tk", rank=4, dropout=0.0)
    randomize(tuned)
    factors = factors_of(tuned)
    assert factors.slice_factors is not None
    width = 4 + 2 * 3
    with torch.no_grad():
        factors.slice_factors[:, width : 2 * width] = 0
        for b, block in enumerate(blocks_of(tuned)):
            for name, layer in wrapped(block).items():
                is_zero = bool(layer.delta_weight().abs().max() == 0)
                assert is_zero == (b == 1), f"blocks[{b}].{name}"


# -- dropout ---------------------------------------------------------------------------------------------------


def test_dropout_acts_only_in_train_mode(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    x, _ = tiny_batch
    noisy = attach(tiny_vit, dropout=0.5)
    clean = attach(tiny_vit, dropout=0.0)
    randomize(noisy)
    randomize(clean)
    with torch.no_grad():
        noisy.module.eval()
        clean.module.eval()
        reference = clean.module(x)
        torch.testing.assert_close(noisy.module(x), reference, rtol=0, atol=0)
        torch.testing.assert_close(noisy.module(x), reference, rtol=0, atol=0)
        noisy.module.train()
        torch.manual_seed(0)
        first = noisy.module(x)
        second = noisy.module(x)
    assert not torch.allclose(first, reference, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-4)


def test_without_dropout_train_and_eval_agree(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    x, _ = tiny_batch
    tuned = attach(tiny_vit, dropout=0.0)
    randomize(tuned)
    with torch.no_grad():
        tuned.module.train()
        train_out = tuned.module(x)
        tuned.module.eval()
        eval_out = tuned.module(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_dropout_touches_only_the_fact_path(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """At init V = 0, so even heavy dropout in train mode leaves the backbone's output exactly as it was."""
    x, _ = tiny_batch
    backbone = tiny_vit()
    reference = copy.deepcopy(backbone).train()
    # head_init 'timm' keeps the built head, so the reference's head is the same
    tuned = build_tuned_model(backbone, make_tuner("fact", {"variant": "tk", "dropout": 0.9, "head_init": "timm"}))
    tuned.module.train()
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), reference(x), rtol=0, atol=0)


# -- attach-time errors ----------------------------------------------------------------------------------------


def test_fc1_width_not_a_multiple_of_the_embedding_width(tiny_vit: TinyVitFactory) -> None:
    spec = TINY_BACKBONE.model_copy(update={"kwargs": {**TINY_BACKBONE.kwargs, "mlp_ratio": 3.5}})  # 224 = 3.5·64
    backbone = build_backbone(spec, 10)
    with pytest.raises(TunerError, match=r"blocks\[0\]\.mlp\.fc1 has 224 outputs, not a multiple of .* 64") as info:
        build_tuned_model(backbone, make_tuner("fact", {}))
    assert "\n" not in str(info.value)
    # validation runs before any change: the model is left as it was
    assert not hasattr(backbone, "fact")
    assert not any(isinstance(m, FactLinear) for m in backbone.modules())


def test_model_without_blocks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(TunerError, match=r"has no `blocks`") as info:
        make_tuner("fact", {}).attach(model)
    assert "\n" not in str(info.value)


def test_rank_above_embedding_width(tiny_vit: TinyVitFactory) -> None:
    with pytest.raises(TunerError, match=r"tuner\.rank 65 exceeds the embedding width 64"):
        build_tuned_model(tiny_vit(), make_tuner("fact", {"rank": 65}))


def test_attaching_twice_is_refused(tiny_vit: TinyVitFactory) -> None:
    tuned = attach(tiny_vit)
    with pytest.raises(TunerError, match="attach FacT once"):
        make_tuner("fact", {}).attach(tuned.module)


def test_config_bounds() -> None:
    from pydantic import ValidationError

    for bad in ({"rank": 0}, {"scale": 0.0}, {"dropout": 1.0}, {"variant": "cp"}, {"alpha": 2}):
        with pytest.raises(ValidationError):
            make_tuner("fact", bad)
    assert make_tuner("fact", {"rank": 16}).knob_value() == 16.0
