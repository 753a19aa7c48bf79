"""VPT's own math (METHODS.md §5): where prompts go, how deep VPT replaces them, what reaches the head, init, counts."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.vpt import Vpt
from petlbench.tuners.vpt.layers import VptDeepBlock, VptInsert, VptStrip, prompt_init_bound
from tests.conftest import TINY_BACKBONE, TINY_CLASSES

P = 5  # prompt length for the tiny model: distinct from its 1 prefix token, 16 patches, 64 channels, 3 blocks
NUM_PATCHES = 16  # 32 px / patch 8 → 4×4


def tiny(seed: int = 0, **kwargs: Any) -> nn.Module:
    """The conftest tiny ViT with extra timm kwargs (global_pool, class_token, reg_tokens, in_chans, ...)."""
    torch.manual_seed(seed)
    spec = TINY_BACKBONE.model_copy(update={"kwargs": {**TINY_BACKBONE.kwargs, **kwargs}})
    return build_backbone(spec, TINY_CLASSES)


def attach(backbone: nn.Module, **params: Any) -> TunedModel:
    torch.manual_seed(123)
    return build_tuned_model(backbone, make_tuner("vpt", {"prompt_len": P, **params}))


def timm_block(model: nn.Module, k: int) -> nn.Module:
    block = model.blocks[k]
    return block.base if isinstance(block, VptDeepBlock) else block


def batch(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(5))


@contextmanager
def record_blocks(model: nn.Module) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Inputs and outputs of every timm block (inside any VPT wrapper), in call order."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handles = []
    for k in range(len(model.blocks)):
        block = timm_block(model, k)
        handles.append(block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone())))
        handles.append(block.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone())))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def perturb_last_block_output(model: nn.Module, positions: slice) -> Iterator[None]:
    """Add a fixed random vector to the last block's output at the given token positions.

    Not a constant: the final LayerNorm would remove a shift that is the same in every channel.
    """

    def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, positions] += torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(3))
        return out

    handle = timm_block(model, len(model.blocks) - 1).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- 1. exact parameter counts (METHODS.md §6) -----------------------------------------------------------------


@pytest.mark.parametrize(("deep", "trainable", "added"), [(False, 115_300, 38_400), (True, 537_700, 460_800)])
def test_parameter_counts_vit_b16(deep: bool, trainable: int, added: int) -> None:
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), 100)
        tuned = build_tuned_model(backbone, make_tuner("vpt", {"prompt_len": 50, "deep": deep}))
    assert tuned.params_trainable == trainable
    assert tuned.params_added == added
    assert tuned.params_total == 85_798_656 + 76_900 + added
    prompts = [m for m in tuned.module.modules() if isinstance(m, VptInsert | VptDeepBlock)]
    assert len(prompts) == (12 if deep else 1)
    assert all(m.prompt.shape == (50, 768) for m in prompts)


def test_prompt_sets_follow_model_depth_and_width() -> None:
    tuned = attach(tiny(), deep=True)
    params = {n: p.shape for n, p in tuned.module.named_parameters() if p.requires_grad}
    assert params == {
        "norm_pre.prompt": (P, 64),
        "blocks.1.prompt": (P, 64),
        "blocks.2.prompt": (P, 64),
        "head.weight": (TINY_CLASSES, 64),
        "head.bias": (TINY_CLASSES,),
    }
    shallow = attach(tiny(), deep=False)
    assert [n for n, p in shallow.module.named_parameters() if p.requires_grad] == [
        "norm_pre.prompt",
        "head.weight",
        "head.bias",
    ]
    assert not any(isinstance(b, VptDeepBlock) for b in shallow.module.blocks)


# -- 2. where prompts sit inside the blocks -----------------------------------------------------------------


def test_prompts_inserted_after_prefix_before_patches_without_pos_embed() -> None:
    backbone = tiny()
    reference = copy.deepcopy(backbone).eval()
    tuned = attach(backbone, deep=False)
    tuned.module.eval()
    x = batch()
    with torch.no_grad(), record_blocks(reference) as (ref_in, _):
        reference(x)
    with torch.no_grad(), record_blocks(tuned.module) as (vpt_in, _):
        tuned.module(x)
    z0, e = vpt_in[0], ref_in[0]
    assert e.shape[1] == 1 + NUM_PATCHES
    assert z0.shape == (len(x), 1 + P + NUM_PATCHES, 64)
    torch.testing.assert_close(z0[:, :1], e[:, :1], rtol=0, atol=0)  # CLS (+ its pos embed) first
    torch.testing.assert_close(z0[:, 1 + P :], e[:, 1:], rtol=0, atol=0)  # pos-embedded patches after the prompts
    prompt = tuned.module.norm_pre.prompt.detach()
    torch.testing.assert_close(z0[:, 1 : 1 + P], prompt.expand(len(x), -1, -1), rtol=0, atol=0)  # raw: no pos embed


@pytest.mark.parametrize("deep", [True, False])
def test_sequence_length_in_every_block_is_n_plus_p(deep: bool) -> None:
    tuned = attach(tiny(), deep=deep)
    tuned.module.train()  # the training path, where it matters for memory
    with record_blocks(tuned.module) as (inputs, outputs):
        tuned.module(batch())
    assert len(inputs) == len(outputs) == 3
    assert {t.shape[1] for t in inputs + outputs} == {1 + NUM_PATCHES + P}


def test_deep_replaces_prompt_positions_with_each_layers_prompts() -> None:
    tuned = attach(tiny(), deep=True)
    tuned.module.eval()
    model = tuned.module
    with torch.no_grad(), record_blocks(model) as (inputs, outputs):
        model(batch())
    layer_prompts = [model.norm_pre.prompt] + [model.blocks[k].prompt for k in range(1, 3)]
    for k in range(3):
        expected = layer_prompts[k].detach().expand(inputs[k].shape[0], -1, -1)
        torch.testing.assert_close(inputs[k][:, 1 : 1 + P], expected, rtol=0, atol=0)
    for k in range(1, 3):  # replaced, not shifted: every other position is the previous block's output
        torch.testing.assert_close(inputs[k][:, :1], outputs[k - 1][:, :1], rtol=0, atol=0)
        torch.testing.assert_close(inputs[k][:, 1 + P :], outputs[k - 1][:, 1 + P :], rtol=0, atol=0)
        assert not torch.equal(inputs[k][:, 1 : 1 + P], outputs[k - 1][:, 1 : 1 + P])


def test_shallow_carries_prompt_outputs_through_the_blocks() -> None:
    tuned = attach(tiny(), deep=False)
    tuned.module.eval()
    with torch.no_grad(), record_blocks(tuned.module) as (inputs, outputs):
        tuned.module(batch())
    for k in range(1, 3):
        torch.testing.assert_close(inputs[k], outputs[k - 1], rtol=0, atol=0)


def test_register_tokens_stay_ahead_of_the_prompts() -> None:
    backbone = tiny(reg_tokens=2)
    assert backbone.num_prefix_tokens == 3
    reference = copy.deepcopy(backbone).eval()
    tuned = attach(backbone, deep=True)
    tuned.module.eval()
    x = batch()
    with torch.no_grad(), record_blocks(reference) as (ref_in, _):
        reference(x)
    with torch.no_grad(), record_blocks(tuned.module) as (vpt_in, _):
        tuned.module(x)
    torch.testing.assert_close(vpt_in[0][:, :3], ref_in[0][:, :3], rtol=0, atol=0)
    torch.testing.assert_close(vpt_in[0][:, 3 + P :], ref_in[0][:, 3:], rtol=0, atol=0)
    prompt = tuned.module.blocks[2].prompt.detach()
    torch.testing.assert_close(vpt_in[2][:, 3 : 3 + P], prompt.expand(len(x), -1, -1), rtol=0, atol=0)


def test_prompt_dropout_draws_a_mask_per_sample_in_training_only() -> None:
    tuned = attach(tiny(), deep=False, dropout=0.5)
    model = tuned.module
    prompt = model.norm_pre.prompt.detach()
    model.train()
    with torch.no_grad(), record_blocks(model) as (inputs, _):
        model(batch())
    dropped = inputs[0][:, 1 : 1 + P]
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    assert not torch.equal(kept[0], kept[1])  # per-sample masks
    torch.testing.assert_close(dropped[kept], (2 * prompt.expand_as(dropped))[kept])  # inverted-dropout scale
    model.eval()
    with torch.no_grad(), record_blocks(model) as (inputs, _):
        model(batch())
    torch.testing.assert_close(inputs[0][:, 1 : 1 + P], prompt.expand(2, -1, -1), rtol=0, atol=0)


def run(model: nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        out: torch.Tensor = model(batch())
    return out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_backbone_mode_decides_whether_the_backbones_drop_path_acts(mode: str) -> None:
    """Official VPT (default 'eval'): the frozen encoder runs in eval mode while the prompts train."""
    torch.manual_seed(0)
    backbone = build_backbone(TINY_BACKBONE.model_copy(update={"drop_path_rate": 0.5}), TINY_CLASSES)
    model = attach(backbone, backbone_mode=mode).module
    model.eval()
    eval_out = run(model, 0)
    model.train()
    first, second = run(model, 1), run(model, 2)
    if mode == "eval":
        torch.testing.assert_close(first, eval_out, rtol=0, atol=0)
        torch.testing.assert_close(second, eval_out, rtol=0, atol=0)
    else:
        assert not torch.allclose(first, second) and not torch.allclose(first, eval_out)


def test_backbone_mode_eval_keeps_the_prompt_dropout() -> None:
    model = attach(tiny(), dropout=0.5).module.train()  # backbone_mode 'eval' by default
    assert not torch.allclose(run(model, 1), run(model, 2))
    assert model.norm_pre.dropout.training and not model.norm_pre.base.training


# -- 3. prompts reach the head only through attention into the pooled tokens ----------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # global_pool="token": timm's head reads x[:, 0]
        {"global_pool": "avg"},
        {"global_pool": "max"},
        {"global_pool": "map"},  # attention pooling over the non-prefix tokens
        {"global_pool": "avg", "class_token": False},  # no prefix at all: prompts come first
        {"reg_tokens": 2},
    ],
    ids=["token", "avg", "max", "map", "avg-no-cls", "token-registers"],
)
def test_prompt_outputs_never_reach_the_head_directly(kwargs: dict[str, Any]) -> None:
    tuned = attach(tiny(**kwargs), deep=True)
    model = tuned.module.eval()
    k = model.num_prefix_tokens
    x = batch()
    with torch.no_grad():
        logits = model(x)
        with perturb_last_block_output(model, slice(k, k + P)):
            assert torch.equal(model(x), logits), "prompt outputs of the last block reached the head"
        with perturb_last_block_output(model, slice(k + P, None)):  # control: the patch outputs do matter...
            moved = model(x)
        if model.global_pool == "token":  # ...except with token pooling, where only the class token does
            assert torch.equal(moved, logits)
            with perturb_last_block_output(model, slice(0, 1)):
                moved = model(x)
        assert not torch.allclose(moved, logits)


@pytest.mark.parametrize(("pool", "tokens"), [("token", 1 + P + NUM_PATCHES), ("avg", 1 + NUM_PATCHES)])
def test_prompts_dropped_before_the_final_norm_only_for_token_reducing_pools(pool: str, tokens: int) -> None:
    tuned = attach(tiny(global_pool=pool), deep=True)
    assert isinstance(tuned.module.norm, VptStrip) == (pool != "token")
    with torch.no_grad():
        assert tuned.module.forward_features(batch()).shape == (2, tokens, 64)


def test_last_layer_prompts_change_the_logits_through_attention() -> None:
    tuned = attach(tiny(), deep=True)
    model = tuned.module.eval()
    x = batch()
    with torch.no_grad():
        before = model(x)
        last = model.blocks[-1].prompt
        last.add_(torch.randn(last.shape, generator=torch.Generator().manual_seed(4)))  # constant shifts: LN eats them
        after = model(x)
    assert (after - before).abs().max() > 1e-4
    # and the gradient to the last prompt set is non-zero: it is used, not only counted
    model.zero_grad()
    model(x).sum().backward()
    assert model.blocks[-1].prompt.grad is not None and model.blocks[-1].prompt.grad.abs().sum() > 0


def test_grad_checkpointing_gives_the_same_output_and_gradients() -> None:
    plain, ckpt = attach(tiny(), deep=True), attach(tiny(), deep=True)
    ckpt.module.set_grad_checkpointing(True)
    x = batch()
    out_plain, out_ckpt = plain.module(x), ckpt.module(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    torch.testing.assert_close(ckpt.module.blocks[1].prompt.grad, plain.module.blocks[1].prompt.grad)


# -- 4. init -------------------------------------------------------------------------------------------------


def test_init_bound_vit_b16_is_0_0625() -> None:
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), 100)
    assert prompt_init_bound(backbone) == 0.0625  # sqrt(6 / (3·16·16 + 768)), exact in binary


@pytest.mark.parametrize(("in_chans", "fan_in"), [(3, 3 * 8 * 8), (1, 1 * 8 * 8)])
def test_prompts_are_uniform_within_the_patch_fan_bound(in_chans: int, fan_in: int) -> None:
    backbone = tiny(in_chans=in_chans)
    bound = math.sqrt(6 / (fan_in + 64))
    assert prompt_init_bound(backbone) == pytest.approx(bound, rel=1e-12)
    tuned = attach(backbone, deep=True, prompt_len=200)
    prompts = torch.cat([m.prompt.detach().flatten() for m in tuned.module.modules() if hasattr(m, "prompt")])
    assert prompts.abs().max() <= bound
    assert prompts.max() > 0.95 * bound and prompts.min() < -0.95 * bound  # fills the interval: uniform, not N(0, σ)
    assert abs(prompts.mean().item()) < 0.05 * bound
    assert prompts.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # variance of U(-v, v)


# -- config and errors ---------------------------------------------------------------------------------------


def test_config_defaults_and_bounds() -> None:
    cfg = Vpt()
    assert (cfg.prompt_len, cfg.deep, cfg.dropout) == (50, True, 0.0)
    assert (cfg.backbone_mode, cfg.head_init) == ("eval", "vpt")  # what VPT's official code does
    assert cfg.knob_value() == 50.0
    for bad in ({"prompt_len": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"prompt_length": 5}):
        with pytest.raises(ValidationError):
            Vpt.model_validate(bad)


def test_attaching_twice_is_refused() -> None:
    tuned = attach(tiny())
    with pytest.raises(TunerError, match="already has VPT"):
        make_tuner("vpt", {}).attach(tuned.module)


def test_non_vit_backbone_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.blocks = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TunerError, match="vpt: backbone"):
        make_tuner("vpt", {}).attach(model)
