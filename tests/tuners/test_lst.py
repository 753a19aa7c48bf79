"""LST on a ViT (docs/methods.md, "LST"): the port's documented structure, pruning, gates, and no backbone backprop."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.lst import Lst
from petlbench.tuners.lst.layers import LstModel
from tests.conftest import TINY_CLASSES, TinyVitFactory

DEPTH, DIM, HIDDEN, HEADS, TOKENS = 3, 64, 192, 2, 17  # the tiny ViT (tests/conftest.py)


def lst(backbone: nn.Module, seed: int = 1, **params: Any) -> TunedModel:
    torch.manual_seed(seed)
    return build_tuned_model(backbone, make_tuner("lst", params))


def root(tuned: TunedModel) -> LstModel:
    assert isinstance(tuned.module, LstModel)
    return tuned.module


def lst_parameters(d_model: int, depth: int, hidden: int, classes: int, r: int, side: int) -> int:
    """Side blocks (qkv, proj, fc1, fc2 with biases, two LayerNorms) at width D/r, MLP h/r; side+1 ladders
    D→D/r with bias; one gate per side block; the side final norm; the upsample D/r→D; the C-way head."""
    d, m = d_model // r, hidden // r
    block = (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d) + 4 * d
    return (
        side * block + (side + 1) * (d_model * d + d) + side + 2 * d + (d * d_model + d_model) + classes * (d_model + 1)
    )


# -- 1. structure ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("r", "layers"), [(8, None), (4, (0, 2)), (2, (1,))])
def test_side_network_shapes(tiny_vit: TinyVitFactory, r: int, layers: tuple[int, ...] | None) -> None:
    tuned = lst(tiny_vit(), reduction=r, side_layers=layers)
    model = root(tuned)
    expected_layers = tuple(range(DEPTH)) if layers is None else layers
    d = DIM // r
    assert model.layers == expected_layers
    assert list(model.side_blocks) == [str(i) for i in expected_layers] == list(model.downsamples)
    assert model.gates.shape == (len(expected_layers),)
    for block in model.side_blocks.values():
        assert block.norm1.weight.shape == (d,)
        assert block.attn.num_heads == HEADS and block.attn.head_dim == DIM // HEADS // r
        assert block.attn.qkv.weight.shape == (3 * d, d)
        assert block.mlp.fc1.weight.shape == (HIDDEN // r, d)
        assert block.mlp.fc2.weight.shape == (d, HIDDEN // r)
    assert (model.first_downsample.in_features, model.first_downsample.out_features) == (DIM, d)
    assert (model.upsample.in_features, model.upsample.out_features) == (d, DIM)
    assert model.side_norm.weight.shape == (d,)
    assert tuned.params_trainable == lst_parameters(DIM, DEPTH, HIDDEN, TINY_CLASSES, r, len(expected_layers))


def test_ladders_and_gates_start_as_the_official_init(tiny_vit: TinyVitFactory) -> None:
    model = root(lst(tiny_vit(), gate_alpha=0.5, gate_temperature=0.25))
    torch.testing.assert_close(model.gates, torch.full((DEPTH,), 0.5))
    assert model.gate(1).item() == pytest.approx(1 / (1 + math.exp(-2.0)))  # sigmoid(α / T)
    ladders = [model.first_downsample, *model.downsamples.values(), model.upsample]
    for ladder in ladders:
        assert ladder.bias is not None and torch.equal(ladder.bias, torch.zeros_like(ladder.bias))
    weights = torch.cat([ladder.weight.flatten() for ladder in ladders])
    assert abs(weights.std().item() / 0.01 - 1) < 0.1 and abs(weights.mean().item()) < 1e-3  # N(0, 0.01²)
    assert all(ladder.bias is None for ladder in [root(lst(tiny_vit(), ladder_bias=False)).upsample])


# -- 2. pruning -----------------------------------------------------------------------------------------------------


def top_rows(importance: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` rows of largest L1 norm (over every other axis), ascending."""
    scores = np.abs(importance.reshape(importance.shape[0], -1)).sum(axis=1)
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def expected_pruning(backbone: nn.Module, r: int) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The documented chain, in numpy: embedding rows → norm1 → qkv (W_q⊙W_k⊙W_v rows) → proj rows → norm2 → fc1
    rows → fc2 rows → next block ...; final norm on the last fc2's rows."""
    vit: Any = backbone

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()

    rows = top_rows(a(vit.patch_embed.proj.weight), DIM // r)
    states = []
    for blk in vit.blocks:
        s: dict[str, np.ndarray] = {"norm1.weight": a(blk.norm1.weight)[rows], "norm1.bias": a(blk.norm1.bias)[rows]}
        w, b = a(blk.attn.qkv.weight)[:, rows], a(blk.attn.qkv.bias)
        wq, wk, wv = w[:DIM], w[DIM : 2 * DIM], w[2 * DIM :]
        inner = top_rows(wq * wk * wv, DIM // r)
        s["attn.qkv.weight"] = np.concatenate([wq[inner], wk[inner], wv[inner]])
        s["attn.qkv.bias"] = np.concatenate([b[:DIM][inner], b[DIM : 2 * DIM][inner], b[2 * DIM :][inner]])
        wo = a(blk.attn.proj.weight)[:, inner]
        rows = top_rows(wo, DIM // r)
        s["attn.proj.weight"], s["attn.proj.bias"] = wo[rows], a(blk.attn.proj.bias)[rows]
        s["norm2.weight"], s["norm2.bias"] = a(blk.norm2.weight)[rows], a(blk.norm2.bias)[rows]
        w1 = a(blk.mlp.fc1.weight)[:, rows]
        hid = top_rows(w1, HIDDEN // r)
        s["mlp.fc1.weight"], s["mlp.fc1.bias"] = w1[hid], a(blk.mlp.fc1.bias)[hid]
        w2 = a(blk.mlp.fc2.weight)[:, hid]
        rows = top_rows(w2, DIM // r)
        s["mlp.fc2.weight"], s["mlp.fc2.bias"] = w2[rows], a(blk.mlp.fc2.bias)[rows]
        states.append(s)
    return states, {"weight": a(vit.norm.weight)[rows], "bias": a(vit.norm.bias)[rows]}


def randomise_norms(backbone: nn.Module) -> None:
    """timm inits LayerNorms to ones/zeros; random values make every selected row visible."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))


@pytest.mark.parametrize("r", [8, 4])
def test_every_side_weight_is_the_documented_pruned_backbone_row(tiny_vit: TinyVitFactory, r: int) -> None:
    backbone = tiny_vit()
    randomise_norms(backbone)
    states, final = expected_pruning(backbone, r)
    model = root(lst(backbone, reduction=r))
    for i, state in enumerate(states):
        got = {k: v.detach().numpy() for k, v in model.side_blocks[str(i)].state_dict().items()}
        assert set(got) == set(state)
        for key, value in state.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"side block {i} {key}")
    np.testing.assert_array_equal(model.side_norm.weight.detach().numpy(), final["weight"])
    np.testing.assert_array_equal(model.side_norm.bias.detach().numpy(), final["bias"])


def test_pruning_keeps_planted_large_rows(tiny_vit: TinyVitFactory) -> None:
    """Rows made 10x larger are the ones kept: embedding dims → norm1, then q/k/v rows, proj rows, fc1 rows."""
    backbone = tiny_vit()
    randomise_norms(backbone)
    hidden_dims, inner, out_dims, ffn = (
        [1, 9, 20, 31, 40, 47, 55, 63],
        [0, 5, 6, 17, 33, 34, 50, 61],
        list(range(8)),
        [*range(3, 192, 8)],
    )
    blk: Any = backbone.blocks[0]
    with torch.no_grad():
        backbone.patch_embed.proj.weight[hidden_dims] *= 10
        for third in range(3):
            blk.attn.qkv.weight[[third * DIM + i for i in inner]] *= 10
        blk.attn.proj.weight[out_dims] *= 10
        blk.mlp.fc1.weight[ffn] *= 10
    side: Any = root(lst(backbone)).side_blocks["0"]
    torch.testing.assert_close(side.norm1.weight, blk.norm1.weight[hidden_dims], rtol=0, atol=0)
    q_rows = blk.attn.qkv.weight[inner][:, hidden_dims]
    torch.testing.assert_close(side.attn.qkv.weight[:8], q_rows, rtol=0, atol=0)
    torch.testing.assert_close(side.attn.qkv.bias[16:], blk.attn.qkv.bias[2 * DIM :][inner], rtol=0, atol=0)
    torch.testing.assert_close(side.attn.proj.weight, blk.attn.proj.weight[out_dims][:, inner], rtol=0, atol=0)
    torch.testing.assert_close(side.norm2.weight, blk.norm2.weight[out_dims], rtol=0, atol=0)
    torch.testing.assert_close(side.mlp.fc1.weight, blk.mlp.fc1.weight[ffn][:, out_dims], rtol=0, atol=0)


def test_random_init_keeps_fresh_side_blocks(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    randomise_norms(backbone)
    states, _ = expected_pruning(backbone, 8)
    model = root(lst(backbone, init="random"))
    assert not np.allclose(model.side_blocks["0"].attn.qkv.weight.detach().numpy(), states[0]["attn.qkv.weight"])
    torch.testing.assert_close(model.side_norm.weight, torch.ones(DIM // 8))


# -- 3. the forward, by hand ---------------------------------------------------------------------------------------


def side_block_by_hand(block: Any, s: torch.Tensor) -> torch.Tensor:
    """timm's pre-norm block at side width: LN → qkv → per-head softmax(q kᵀ/√hd) v → proj → +; LN → fc1 → GELU
    → fc2 → +."""
    b, n, d = s.shape
    heads = block.attn.num_heads
    hd = d // heads
    u = F.layer_norm(s, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = u @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (qkv[..., j * d : (j + 1) * d].reshape(b, n, heads, hd).transpose(1, 2) for j in range(3))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    s = s + ctx.transpose(1, 2).reshape(b, n, d) @ block.attn.proj.weight.T + block.attn.proj.bias
    u = F.layer_norm(s, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    h = F.gelu(u @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return s + h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize("fused_attn", [True, False])
def test_one_side_layer_by_hand(tiny_vit: TinyVitFactory, fused_attn: bool) -> None:
    """side_layers=[1], α = 0.3, T = 0.1: s = down_emb(tokens); g = sigmoid(3); s = g·s + (1-g)·down_1(block_1
    output); s = side block; head(upsample(norm(s)[:, 0]))."""
    backbone = tiny_vit(fused_attn=fused_attn)
    model = root(lst(backbone, side_layers=[1], gate_alpha=0.3)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone._pos_embed(backbone.patch_embed(x))
        out1 = backbone.blocks[1](backbone.blocks[0](tokens))
        g = 1 / (1 + math.exp(-3.0))
        s = tokens @ model.first_downsample.weight.T + model.first_downsample.bias
        down = model.downsamples["1"]
        s = g * s + (1 - g) * (out1 @ down.weight.T + down.bias)
        s = side_block_by_hand(model.side_blocks["1"], s)
        norm = model.side_norm
        s = F.layer_norm(s, (DIM // 8,), norm.weight, norm.bias, norm.eps)
        f = s[:, 0] @ model.upsample.weight.T + model.upsample.bias
        expected = f @ backbone.head.weight.T + backbone.head.bias
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_mean_pooling_models_read_the_mean_of_the_patch_tokens(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    backbone.global_pool = "avg"
    model = root(lst(backbone)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.side_stream(x)[:, 1:].mean(dim=1) @ model.upsample.weight.T + model.upsample.bias
        torch.testing.assert_close(model(x), backbone.head(f), rtol=1e-5, atol=1e-5)


# -- 4. no backprop into the backbone -------------------------------------------------------------------------------


def test_backbone_runs_without_autograd_and_only_ladder_inputs_are_kept(
    tiny_vit: TinyVitFactory, tiny_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = root(lst(tiny_vit())).train()
    x, y = tiny_batch
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: outputs.append(out)) for blk in model.backbone.blocks]
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
    assert len(outputs) == DEPTH and not any(out.requires_grad for out in outputs)
    token = len(x) * TOKENS * DIM * 4  # one full-width B x N x D fp32 tensor
    assert sorted(n for n in saved.values() if n >= token) == [token] * (DEPTH + 1)  # embedding + block outputs
    assert {o.untyped_storage().data_ptr() for o in outputs} <= saved.keys()  # ... the ladders' inputs
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)
    assert model.gates.grad is not None and model.gates.grad.abs().sum() > 0


def test_blocks_after_the_last_side_layer_do_not_run(tiny_vit: TinyVitFactory) -> None:
    model = root(lst(tiny_vit(), side_layers=[0, 1]))
    calls: list[int] = []
    for i, blk in enumerate(model.backbone.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [0, 1]


# -- 5. parameters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"), [({}, 2_453_392), ({"side_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11]}, 1_896_397)]
)
def test_trainable_parameters_on_vit_b(params: dict[str, Any], expected: int) -> None:
    """ViT-B/16, r = 8, 100 classes; pruning runs on the meta device too (shapes only). Without the head the full
    network is 2,376,492 ≈ the 2.38M listed for LST on VTAB-1k."""
    with torch.device("meta"):
        tuned = build_tuned_model(build_backbone(BackboneSpec(), 100), make_tuner("lst", params))
    side = len(params.get("side_layers", range(12)))
    assert tuned.params_trainable == expected == lst_parameters(768, 12, 3072, 100, 8, side)
    assert tuned.params_added == expected - 76_900


# -- 6. knobs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"reduction": 1},
        {"gate_temperature": 0.0},
        {"side_layers": []},
        {"side_layers": [1, 1]},
        {"side_layers": [-1]},
        {"init": "fisher"},
        {"r": 8},
    ],
)
def test_config_rejects_bad_knobs(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Lst.model_validate(bad)


def test_side_layers_are_sorted() -> None:
    assert Lst(side_layers=(2, 0)).side_layers == (0, 2)


@pytest.mark.parametrize(
    ("params", "change", "message"),
    [
        ({"side_layers": [0, 3]}, None, r"names block 3, but the ViT has 3 blocks"),
        ({"reduction": 3}, None, r"tuner\.reduction 3 does not divide the embedding width 64"),
        ({"reduction": 64}, None, r"does not divide the head width 32"),
        ({}, "max", r"pooling 'max' is not supported"),
        ({}, "block", r"blocks\[1\] is not a plain timm Block"),
    ],
)
def test_model_dependent_checks(
    tiny_vit: TinyVitFactory, params: dict[str, Any], change: str | None, message: str
) -> None:
    backbone = tiny_vit()
    if change == "max":
        backbone.global_pool = "max"
    elif change == "block":
        backbone.blocks[1] = nn.Identity()
    with pytest.raises(TunerError, match=message):
        lst(backbone, **params)
