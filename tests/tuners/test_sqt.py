"""SQT/SynQT (METHODS.md §1): parameter formula, what autograd keeps, head layout, LN_head, backbone mode."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.measure.memory import tracked_train_step
from petlbench.measure.step import TrainStep, make_optimizer
from petlbench.spec.models import BackboneSpec, OptimizerSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.sqt import Sqt
from petlbench.tuners.sqt.model import (
    Adapter,
    InstanceAwareHead,
    QuerySynthesis,
    SqtModel,
    head_tokens,
    knowledge_extraction,
    last_block_kv,
)
from tests.conftest import TINY_BACKBONE, TINY_CLASSES, TinyVitFactory

DEPTH = 3  # the tiny ViT's blocks (tests/conftest.py)


def sqt(backbone: nn.Module, seed: int = 1, **params: Any) -> TunedModel:
    torch.manual_seed(seed)
    return build_tuned_model(backbone, make_tuner("sqt", params))


def root(tuned: TunedModel) -> SqtModel:
    assert isinstance(tuned.module, SqtModel)
    return tuned.module


# -- 1. parameter accounting against the official formula ---------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [(1, 2_681_297), (4, 2_708_945), (16, 2_819_537)])
def test_trainable_parameters_match_official_minus_unused(n: int, expected: int) -> None:
    """METHODS §1.11: official printout 2,613,650 + 9,216n + 769C, less the 18,469 parameters it never uses."""
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), 100)
        tuned = build_tuned_model(backbone, make_tuner("sqt", {"num_queries": n}))
    assert tuned.params_trainable == expected == 2_613_650 + 9_216 * n + 769 * 100 - 18_469
    assert tuned.params_added == expected - (768 * 100 + 100)  # everything but the classifier is new
    frozen = sum(p.numel() for p in tuned.backbone.parameters() if not p.requires_grad)
    assert frozen == 85_798_656  # the whole ViT-B/16 stays frozen, classifier aside


# -- 2. the token path keeps nothing for backward -----------------------------------------------------------------


@pytest.mark.parametrize("fused_attn", [True, False])
def test_only_query_path_and_kv_are_saved_for_backward(
    tiny_vit: TinyVitFactory, tiny_batch: tuple[torch.Tensor, torch.Tensor], fused_attn: bool, monkeypatch: Any
) -> None:
    tuned = sqt(tiny_vit(fused_attn=fused_attn))
    model = root(tuned)
    model.train()
    x, y = tiny_batch

    kv_storages: set[int] = set()
    kv_bytes: set[int] = set()
    token_path = model.token_path

    def recording_token_path(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kvs = token_path(images)
        for k, v in kvs:
            assert not k.requires_grad and not v.requires_grad
            kv_storages.update(t.untyped_storage().data_ptr() for t in (k, v))
            kv_bytes.update(t.untyped_storage().nbytes() for t in (k, v))
        return kvs

    monkeypatch.setattr(model, "token_path", recording_token_path)
    block_outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: block_outputs.append(out)) for blk in model.blocks]

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}  # storage → bytes, for every tensor autograd keeps that is not a weight

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()

    assert len(block_outputs) == DEPTH - 1  # the last block's token path is skipped (only its K/V run)
    assert all(not out.requires_grad for out in block_outputs)
    assert len(kv_storages) == 2 * DEPTH
    assert kv_storages <= saved.keys(), "every layer's K and V must be what the query path attends to"
    (token_tensor,) = kv_bytes  # K, V are B x heads x N x hd: one B x N x D token tensor each
    assert token_tensor == len(x) * 17 * model.backbone.embed_dim * 4  # 16 patches + cls, fp32
    biggest_other = max(nbytes for ptr, nbytes in saved.items() if ptr not in kv_storages)
    assert biggest_other < token_tensor, "a token-sized backbone activation is kept for backward"

    loss.backward()
    grad = model.queries.grad
    assert grad is not None and all(grad[i].abs().sum() > 0 for i in range(DEPTH))


def test_gradient_reaches_first_layer_queries_through_the_query_chain(
    tiny_vit: TinyVitFactory, tiny_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """With the instance weights forced to 0, the head sees only H_L: P_1 learns only via H_1 → QSM_2 → … → H_L."""
    model = root(sqt(tiny_vit()))
    model.eval()
    with torch.no_grad():
        model.instance_head.weight_gen.weight.zero_()
        model.instance_head.weight_gen.bias.zero_()
    x, y = tiny_batch
    F.cross_entropy(model(x), y).backward()
    grad = model.queries.grad
    assert grad is not None and grad[0].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.feat_scale.zero_()  # cut the chain: layer 1 no longer reaches the head
    F.cross_entropy(model(x), y).backward()
    grad = model.queries.grad
    assert grad is not None and grad[0].abs().sum() == 0 and grad[-1].abs().sum() > 0


# -- 3. the math of the pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_attn", [True, False])
def test_knowledge_extraction_is_the_frozen_block_for_queries(tiny_vit: TinyVitFactory, fused_attn: bool) -> None:
    """Queries equal to the block's own input tokens, over that block's K/V, reproduce the block's output."""
    model = root(sqt(tiny_vit(fused_attn=fused_attn)))
    model.eval()
    backbone = model.backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
        kvs = model.token_path(x)
        for blk, (k, v) in zip(model.blocks, kvs, strict=True):
            torch.testing.assert_close(last_block_kv(blk, tokens), (k, v), rtol=1e-5, atol=1e-6)
            h, f_att, f_ffn = knowledge_extraction(blk, tokens, k, v)
            expected = blk(tokens)
            torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h, tokens + f_att + f_ffn, rtol=1e-5, atol=1e-5)
            tokens = expected


def test_adapter_contains_the_identity() -> None:
    adapter = Adapter(16, 4, 0.1, {"device": torch.device("cpu"), "dtype": torch.float32}).train()
    u = torch.randn(3, 5, 16)
    with torch.no_grad():
        adapter.fc2.weight.zero_()
        adapter.fc2.bias.zero_()
    torch.testing.assert_close(adapter(u), u, rtol=0, atol=0)
    adapter.eval()
    with torch.no_grad():
        adapter.fc2.bias.fill_(1.0)
        torch.testing.assert_close(adapter(u), u + 1.0)


def test_head_tokens_order_and_count(tiny_vit: TinyVitFactory) -> None:
    batch, dim = 2, 8
    hs = [torch.full((batch, dim), 10.0 + i) for i in range(1, DEPTH + 1)]
    att = [torch.full((batch, dim), 20.0 + i) for i in range(1, DEPTH + 1)]
    ffn = [torch.full((batch, dim), 30.0 + i) for i in range(1, DEPTH + 1)]
    tokens = head_tokens(hs, att, ffn)
    assert tokens.shape == (batch, 3 * DEPTH + 1, dim)
    assert tokens[0, :, 0].tolist() == [13.0, 11.0, 12.0, 13.0, 21.0, 22.0, 23.0, 31.0, 32.0, 33.0]

    head = root(sqt(tiny_vit())).instance_head
    assert head.num_tokens == 3 * DEPTH + 1
    assert head.weight_gen.out_features == 3 * DEPTH


def test_instance_head_is_a_weighted_mean_with_anchor_weight_one(tiny_vit: TinyVitFactory) -> None:
    model = root(sqt(tiny_vit()))
    head = model.instance_head.eval()
    tokens = torch.randn(4, 3 * DEPTH + 1, 64)
    t = tokens + head.adapter(head.norm(tokens))
    w = torch.tanh(F.gelu(head.weight_gen(t[:, 0])))
    omega = torch.cat([torch.ones(4, 1), w], dim=1)
    expected = head.final_norm((omega.unsqueeze(-1) * t).mean(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"class_token": False, "global_pool": "avg"}])
def test_ln_head_is_a_fresh_layernorm_with_the_final_norms_values(kwargs: dict[str, Any]) -> None:
    """Official: nn.LayerNorm(D) (eps 1e-5) whose weight/bias take the backbone's final norm's (eps 1e-6) values."""
    torch.manual_seed(0)
    backbone = build_backbone(TINY_BACKBONE.model_copy(update={"kwargs": {**TINY_BACKBONE.kwargs, **kwargs}}), 10)
    final = backbone.fc_norm if kwargs else backbone.norm  # avg pooling: timm's final norm is fc_norm
    with torch.no_grad():
        final.weight.uniform_(0.5, 1.5)
        final.bias.uniform_(-0.5, 0.5)
    weight, bias = final.weight.clone(), final.bias.clone()
    ln_head = root(sqt(backbone)).instance_head.final_norm
    assert isinstance(ln_head, nn.LayerNorm) and ln_head.eps == 1e-5 and final.eps == 1e-6
    assert torch.equal(ln_head.weight, weight) and torch.equal(ln_head.bias, bias)
    assert ln_head.weight.requires_grad and not final.weight.requires_grad
    assert ln_head.weight.untyped_storage().data_ptr() != final.weight.untyped_storage().data_ptr()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(ln_head(x), expected * weight + bias)


def test_head_drop_path_drops_whole_tokens_but_never_the_anchor() -> None:
    cfg = Sqt(head_drop_path=0.5, dropout=0.0)
    factory: dict[str, Any] = {"device": torch.device("cpu"), "dtype": torch.float32}
    head = InstanceAwareHead(16, 7, cfg, nn.Identity(), factory).train()
    captured: list[torch.Tensor] = []
    head.weight_gen.register_forward_hook(lambda m, a, out: captured.append(a[0]))
    tokens = torch.randn(64, 7, 16)
    torch.manual_seed(0)
    train_out = head(tokens)
    head.eval()
    with torch.no_grad():
        eval_out = head(tokens)
    assert torch.equal(captured[0], captured[1])  # the anchor token (weights come from it) is never dropped
    assert not torch.allclose(train_out, eval_out)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_query_synthesis_follows_the_official_formula(fused_attn: bool) -> None:
    cfg = Sqt(attn_scale=0.3, ffn_scale=0.7)
    factory: dict[str, Any] = {"device": torch.device("cpu"), "dtype": torch.float32}
    torch.manual_seed(0)
    qsm = QuerySynthesis(32, cfg, fused_attn, factory).eval()
    z = torch.randn(2, 5, 32)
    with torch.no_grad():
        zp = qsm.proj(z)
        a = qsm.norm_a(zp)
        attn = qsm.attn
        q, k, v = attn.q(attn.norm_q(a)), attn.k(attn.norm_kv(a)), attn.v(attn.norm_kv(a))
        s = torch.softmax(q @ k.transpose(-2, -1) / 32**0.5, dim=-1)
        zp = zp + 0.3 * attn.o(s @ v)
        expected = zp + 0.7 * qsm.ffn(qsm.norm_b(zp))
        torch.testing.assert_close(qsm(z), expected, rtol=1e-5, atol=1e-5)


# -- 4. backbone mode: the frozen blocks' drop path on both paths -------------------------------------------------


def drop_path_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(TINY_BACKBONE.model_copy(update={"drop_path_rate": 0.5}), TINY_CLASSES)


def quiet_sqt(mode: str) -> SqtModel:
    """SQT on a drop-path-0.5 ViT, its own dropouts off, so only the backbone's stochastic depth can act."""
    return root(sqt(drop_path_vit(), backbone_mode=mode, dropout=0.0, head_drop_path=0.0))


def last_kv(model: SqtModel, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        model(x)  # a forward of the root applies the backbone mode
        return model.token_path(x)[-1][0]


def logits(model: SqtModel, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def test_backbone_mode_train_keeps_stochastic_depth_on_both_paths() -> None:
    """Official default: model.train() leaves DropPath active on the token path and on the queries."""
    model = quiet_sqt("train")
    x = torch.randn(16, 3, 32, 32)
    model.eval()
    reference, eval_logits = last_kv(model, x, 0), logits(model, x, 0)
    assert torch.equal(reference, last_kv(model, x, 1))  # eval: deterministic
    model.train()
    assert not torch.equal(last_kv(model, x, 0), last_kv(model, x, 1))
    assert not torch.allclose(logits(model, x, 0), eval_logits)


def test_backbone_mode_eval_makes_both_paths_deterministic() -> None:
    """backbone_mode='eval': a training forward equals the eval forward (SQT's own dropouts are off here)."""
    model = quiet_sqt("eval")
    x = torch.randn(16, 3, 32, 32)
    model.eval()
    reference, eval_logits = last_kv(model, x, 0), logits(model, x, 0)
    model.train()
    assert model.training and model.qsm[0].training
    assert torch.equal(last_kv(model, x, 1), reference)
    torch.testing.assert_close(logits(model, x, 1), eval_logits, rtol=0, atol=0)
    assert not model.blocks[-1].drop_path1.training and model.instance_head.training


def test_backbone_mode_eval_leaves_sqt_dropout_training() -> None:
    model = root(sqt(drop_path_vit(), backbone_mode="eval", dropout=0.5, head_drop_path=0.0))
    x = torch.randn(16, 3, 32, 32)
    model.train()
    assert not torch.allclose(logits(model, x, 0), logits(model, x, 1))


# -- 5. two heads (distilled DeiT) ----------------------------------------------------------------------------------


def test_distilled_deit_averages_both_heads_on_the_sqt_feature() -> None:
    torch.manual_seed(0)
    spec = BackboneSpec(
        model="deit_tiny_distilled_patch16_224",
        img_size=32,
        kwargs={"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    )
    tuned = sqt(build_backbone(spec, TINY_CLASSES))
    model = root(tuned).eval()
    backbone: Any = model.backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.features(x)
        expected = (backbone.head(f) + backbone.head_dist(f)) / 2
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert backbone.head.weight.requires_grad and backbone.head_dist.weight.requires_grad
    bound = 1 / math.sqrt(64)  # head_init 'torch' on both heads
    assert all(h.bias.abs().max() <= bound and h.bias.abs().max() > 0 for h in (backbone.head, backbone.head_dist))


# -- 6. memory -----------------------------------------------------------------------------------------------------


def activation_bytes(tuned: TunedModel, x: torch.Tensor, y: torch.Tensor) -> int:
    """Activation bytes at the peak of a tracked third training step (AdamW state exists from step 1)."""
    model = tuned.module.train()
    step = TrainStep(model, make_optimizer(tuned.trainable_parameters(), OptimizerSpec()), "fp32", "cpu")
    step(x, y)
    step(x, y)
    return tracked_train_step(step, x, y).by_category["activations"]


def test_sqt_keeps_far_fewer_activations_than_lora_on_a_small_vit() -> None:
    """test_vit at 64 px (65 tokens, so n=4 queries are few, as on ViT-B): a real-tensor tracked step."""
    spec = TINY_BACKBONE.model_copy(update={"img_size": 64})
    x, y = torch.randn(8, 3, 64, 64), torch.randint(TINY_CLASSES, (8,))
    lora = activation_bytes(build_tuned_model(build_backbone(spec, TINY_CLASSES), make_tuner("lora", {})), x, y)
    ours = activation_bytes(sqt(build_backbone(spec, TINY_CLASSES)), x, y)
    assert ours < 0.5 * lora, f"SQT activations {ours} B vs LoRA {lora} B"


@pytest.mark.slow
def test_sqt_activations_on_vit_b_are_a_quarter_of_loras() -> None:
    """ViT-B/16, B=8, fp32, fake CPU tensors (byte-exact vs real): SQT n=4 keeps 24 % of LoRA r=8's activations.

    K/V of 12 layers are 24 token tensors per sample; the peak is in the frozen forward of block 11
    (20 + 2 K/V + 11 working set + 1 image ≈ 34 per sample) against LoRA's ≈ 141.5.
    """

    def fake_activation_bytes(tuner: str) -> int:
        with torch.device("meta"):
            tuned = build_tuned_model(build_backbone(BackboneSpec(), 100), make_tuner(tuner, {}))
        with FakeTensorMode(allow_non_fake_inputs=True):
            tuned.module.to_empty(device="cpu")
            return activation_bytes(tuned, torch.randn(8, 3, 224, 224), torch.randint(100, (8,)))

    lora, ours = fake_activation_bytes("lora"), fake_activation_bytes("sqt")
    unit = 8 * 197 * 768 * 4  # one [B, 197, 768] fp32 token tensor
    assert ours < 0.25 * lora
    assert 24 * unit < ours < 36 * unit  # at least the 12 layers' K and V, and not much more


# -- config and backbone checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"num_queries": 0}, {"rank": 0}, {"dropout": 1.0}, {"head_drop_path": -0.1}, {"x": 1}])
def test_config_rejects_bad_knobs(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Sqt.model_validate(bad)


def test_rejects_a_backbone_without_timm_blocks(tiny_vit: TinyVitFactory) -> None:
    backbone = tiny_vit()
    backbone.blocks[1] = nn.Identity()
    with pytest.raises(TunerError, match=r"blocks\[1\]"):
        sqt(backbone)
