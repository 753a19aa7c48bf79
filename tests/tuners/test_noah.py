"""NOAH: forward and gradients against NOAH's forward written out (its VisionTransformer.forward_features,
Block.forward, Attention.forward with LoRA, AdapterSuper.forward) on identical weights, the init against NOAH's
construction order, the default knobs, the shipped subnets against their source, and the parameter count NOAH's
own `get_sampled_params_numel` reports for VTAB subnets at ViT-B/16."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import TunerError
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.noah import SUBNETS_FILE, subnets
from tests.conftest import TINY_BACKBONE, TinyVitFactory
from tests.tuners import handwritten_vit as ref

Batch = tuple[torch.Tensor, torch.Tensor]
Layout = tuple[list[int], list[int], list[int]]  # prompt counts, LoRA ranks, adapter widths per block
SUPERNET = 100  # every subnet file's SUPERNET widths

# block 1 has no prompts, so block 2 (whose previous block had none) appends without removing: 3 + 2 prompt tokens
CARRY: Layout = ([3, 0, 2], [2, 0, 1], [0, 2, 3])
CIFAR_FIRST_BLOCKS: Layout = ([10, 5, 10], [10, 1, 5], [5, 10, 10])  # the cifar subnet on a 3-block model


def attach(tiny_vit: TinyVitFactory, layout: Layout, **params: object) -> tuple[TunedModel, ref.VitParts]:
    backbone = tiny_vit()
    parts = ref.capture(backbone)
    torch.manual_seed(1)
    knobs = {"subnet": None, "prompt_len": layout[0], "lora_rank": layout[1], "adapter_dim": layout[2], **params}
    return build_tuned_model(backbone, make_tuner("noah", knobs)), parts


@dataclass(frozen=True)
class NoahTensors:
    """The subnet's tensors, by block, read from the tuned model."""

    input_prompt: nn.Parameter | None
    input_pos: nn.Parameter | None
    prompts: list[nn.Parameter | None]
    lora: list[tuple[nn.Parameter, nn.Parameter] | None]  # A (r×D), B (3D×r)
    adapters: list[dict[str, nn.Parameter] | None]

    def live(self) -> list[nn.Parameter]:
        out = [p for p in self.prompts if p is not None]
        out += [t for pair in self.lora if pair is not None for t in pair]
        return out + [t for a in self.adapters if a is not None for t in a.values()]

    def dead(self) -> list[nn.Parameter]:
        return [p for p in (self.input_prompt, self.input_pos) if p is not None]


def noah_tensors(tuned: TunedModel, depth: int) -> NoahTensors:
    params = dict(tuned.module.named_parameters())

    def get(name: str) -> nn.Parameter | None:
        return params.get(name)

    lora: list[tuple[nn.Parameter, nn.Parameter] | None] = []
    adapters: list[dict[str, nn.Parameter] | None] = []
    for i in range(depth):
        a, b = get(f"blocks.{i}.base.attn.qkv.lora_A.weight"), get(f"blocks.{i}.base.attn.qkv.lora_B.weight")
        lora.append((a, b) if a is not None and b is not None else None)
        keys = ("down.weight", "down.bias", "up.weight", "up.bias")
        found = {k: v for k in keys if (v := get(f"blocks.{i}.adapter.{k}")) is not None}
        adapters.append(found if len(found) == len(keys) else None)
    return NoahTensors(
        get("norm_pre.prompts.prompt"),
        get("norm_pre.pos_embed"),
        [get(f"blocks.{i}.prompts.prompt") for i in range(depth)],
        lora,
        adapters,
    )


def noah_forward(parts: ref.VitParts, n: NoahTensors, prompt_len: list[int], images: torch.Tensor) -> torch.Tensor:
    """NOAH's model/supernet_vision_transformer_timm.py in eval mode (every dropout and drop path off), written
    out: forward_features appends the input prompts (plus their positional embedding) after the patches; each
    Block.forward first drops the last p_{i-1} tokens (block 0: p_0) and appends its own p_i prompts when p_i != 0;
    Attention adds one LoRA delta to the fused qkv before splitting q, k, v; the adapter (identity + ln2(QuickGELU(
    ln1(h)))) takes the MLP output; the head reads the class token."""
    p = parts.patch
    x = F.conv2d(images, p.weight, p.bias, stride=p.stride).flatten(2).transpose(1, 2)
    batch = x.shape[0]
    x = torch.cat([parts.cls_token.expand(batch, -1, -1), x], dim=1) + parts.pos_embed
    if prompt_len[0] != 0:
        assert n.input_prompt is not None and n.input_pos is not None
        tokens = n.input_prompt[: prompt_len[0]].expand(batch, -1, -1) + n.input_pos[: prompt_len[0]]
        x = torch.cat((x, tokens), dim=1)
    for i, b in enumerate(parts.blocks):
        last = prompt_len[i - 1] if i > 0 else prompt_len[0]  # Block.set_sample_config's sample_last_...
        prompt = n.prompts[i]
        if prompt_len[i] != 0:
            assert prompt is not None
            tokens = prompt.expand(batch, -1, -1)
            x = torch.cat((x, tokens), dim=1) if last == 0 else torch.cat((x[:, :-last, :], tokens), dim=1)
        _, tokens_n, dim = x.shape
        shape = (batch, tokens_n, 3, b.num_heads, dim // b.num_heads)
        y = ref.layer_norm(b.norm1, x)
        q, k, v = F.linear(y, b.qkv.weight, b.qkv.bias).reshape(shape).permute(2, 0, 3, 1, 4).unbind(0)
        pair = n.lora[i]
        if pair is not None:
            dq, dk, dv = F.linear(F.linear(y, pair[0]), pair[1]).reshape(shape).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = q + dq, k + dk, v + dv
        a = ref.attention(q, k, v).transpose(1, 2).reshape(batch, tokens_n, dim)
        x = x + F.linear(a, b.proj.weight, b.proj.bias)
        y = ref.layer_norm(b.norm2, x)
        h = F.linear(F.gelu(F.linear(y, b.fc1.weight, b.fc1.bias)), b.fc2.weight, b.fc2.bias)
        adapter = n.adapters[i]
        if adapter is not None:
            z = F.linear(h, adapter["down.weight"], adapter["down.bias"])
            z = z * torch.sigmoid(1.702 * z)  # QuickGELU
            h = h + F.linear(z, adapter["up.weight"], adapter["up.bias"])
        x = x + h
    x = ref.layer_norm(parts.norm, x)
    return F.linear(x[:, 0], parts.head.weight, parts.head.bias)


@pytest.mark.parametrize("layout", [CARRY, CIFAR_FIRST_BLOCKS], ids=["carry", "cifar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_noah(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, dtype: torch.dtype, layout: Layout
) -> None:
    tuned, parts = attach(tiny_vit, layout)
    tuned.module.to(dtype).eval()
    n = noah_tensors(tuned, len(parts.blocks))
    assert n.input_prompt is not None and n.input_pos is not None
    ref.randomize_([*n.live(), *n.dead()], seed=2)  # adapter biases start at zero: make every term count
    trainable = tuned.trainable_parameters()
    head = [parts.head.weight, parts.head.bias]
    assert {id(p) for p in trainable} == {id(p) for p in [*n.live(), *n.dead(), *head]}
    x = tiny_batch[0].to(dtype)
    ours, theirs = tuned.module(x), noah_forward(parts, n, layout[0], x)
    # the input prompt set is replaced by block 0 before any block reads it: zero gradient, as in NOAH
    for graph in (ours, theirs):
        for grad in torch.autograd.grad(ref.loss_of(graph), n.dead(), retain_graph=True):
            assert grad.abs().max() == 0
    ref.assert_forward_and_grads_match(ours, theirs, [*n.live(), *head], dtype)


def test_without_the_input_prompt_the_function_is_the_same(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    with_input, _ = attach(tiny_vit, CIFAR_FIRST_BLOCKS)
    without, _ = attach(tiny_vit, CIFAR_FIRST_BLOCKS, input_prompt=False)
    live = dict(without.module.named_parameters())
    with torch.no_grad():
        for name, p in with_input.module.named_parameters():
            if name in live:
                live[name].copy_(p)
    x = tiny_batch[0]
    with torch.no_grad():
        torch.testing.assert_close(with_input.module.eval()(x), without.module.eval()(x), rtol=0, atol=1e-6)
    dim = 64
    assert with_input.params_trainable - without.params_trainable == CIFAR_FIRST_BLOCKS[0][0] * dim + SUPERNET * dim


def noah_construction(dim: int, rank: int, width: int) -> dict[str, torch.Tensor]:
    """NOAH's construction order for one block's subnet, re-implemented at the supernet width S = 100: Attention
    draws LoRA_a Kaiming-uniform and LoRA_b zero, AdapterSuper Xavier weights and N(0, 1e-6) biases, Block (and the
    model) Xavier-uniform prompt tensors (1, S, D); then VisionTransformer.init_weights re-draws every nn.Linear
    trunc_normal_(std=.02) with zero bias (prompt tensors are Parameters, not Linears: untouched). The subnet
    slices the first rank / width rows out of each."""
    lora_a, lora_b = nn.Linear(dim, SUPERNET, bias=False), nn.Linear(SUPERNET, 3 * dim, bias=False)
    ln1, ln2 = nn.Linear(dim, SUPERNET), nn.Linear(SUPERNET, dim)
    prompt = torch.empty(1, SUPERNET, dim)
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        for m in (ln1, ln2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)
        nn.init.xavier_uniform_(prompt)
        for m in (lora_a, lora_b, ln1, ln2):  # _init_vit_weights, applied to the whole model
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return {
        "lora_A": lora_a.weight[:rank],
        "lora_B": lora_b.weight[:, :rank],
        "down.weight": ln1.weight[:width],
        "down.bias": ln1.bias[:width],
        "up.weight": ln2.weight[:, :width],
        "up.bias": ln2.bias,
        "prompt": prompt[0, :10],
    }


def test_init_follows_noahs_construction_order(tiny_vit: TinyVitFactory) -> None:
    """Same distributions as NOAH's order: LoRA A and B and the adapter weights N(0, 0.02²) in effect (B is not
    zero: NOAH's LoRA does not start at the identity), adapter biases zero, prompts and the input set's positional
    embedding within Xavier's bound for the (1, 100, D) supernet tensor."""
    tuned, _ = attach(tiny_vit, ([10, 10, 10], [8, 8, 8], [16, 16, 16]))
    torch.manual_seed(3)
    official = noah_construction(64, 8, 16)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(1, SUPERNET, 64))
    bound = math.sqrt(6 / (fan_in + fan_out))
    params = dict(tuned.module.named_parameters())
    ours = {
        "lora_A": params["blocks.1.base.attn.qkv.lora_A.weight"],
        "lora_B": params["blocks.1.base.attn.qkv.lora_B.weight"],
        **{k: params[f"blocks.1.adapter.{k}"] for k in ("down.weight", "down.bias", "up.weight", "up.bias")},
        "prompt": params["blocks.1.prompts.prompt"],
    }
    for key, want in official.items():
        got = ours[key].detach()
        assert got.shape == want.shape, key
        if want.abs().max() == 0:
            assert got.abs().max() == 0, key
        elif key == "prompt":
            assert want.abs().max() <= bound
            for tensor in (got, params["norm_pre.prompts.prompt"], params["norm_pre.pos_embed"]):
                assert bound * 0.9 < tensor.abs().max() <= bound, key
        else:  # 512 to 1,536 draws each
            assert abs(got.std().item() / want.std().item() - 1) < 0.15, key
            assert abs(got.mean().item()) < 0.004 and got.abs().max() < 6 * 0.02, key


def test_default_knobs_are_noahs_retrain_settings(tiny_vit: TinyVitFactory) -> None:
    """supernet_train_prompt.py: --drop_rate_prompt, --drop_rate_LoRA, --drop_rate_adapter default to 0.1 and the
    VTAB retrain script (configs/NOAH/VTAB/subnet/slurm_retrain_vtab.sh) sets none of them; model.train() every
    epoch; reset_classifier draws trunc_normal(std .02) and a zero bias (timm's own head)."""
    tuner = make_tuner("noah", {})
    assert (tuner.prompt_dropout, tuner.lora_dropout, tuner.adapter_dropout) == (0.1, 0.1, 0.1)
    assert (tuner.backbone_mode, tuner.head_init, tuner.subnet, tuner.input_prompt) == ("train", "timm", "cifar", True)
    assert tuner.dropout_rates() == (0.1, 0.1, 0.1)
    tuned = build_tuned_model(tiny_vit(), tuner)
    drops = [m for n, m in tuned.module.named_modules() if n.endswith("dropout") and isinstance(m, nn.Dropout)]
    assert {d.p for d in drops} == {0.1} and len(drops) == 3 + 3 + 3 + 1  # prompts, LoRA, adapter per block; input


def test_shipped_subnets_are_noahs_files() -> None:
    """Every task of subnets.yaml against what its header says the source files contain (12 blocks, widths
    from the search space {1, 5, 10}) and against docs of two tasks read from the source by hand."""
    data = yaml.safe_load(SUBNETS_FILE.read_text())
    assert data["source"]["commit"] == "e9c55f360be4f7f1133a08bf84f86f0309e98f8c"
    layouts = subnets()
    assert len(layouts) == 19
    for task, layout in layouts.items():
        assert all(len(v) == 12 and set(v) <= {1, 5, 10} for v in layout.values()), task
    assert data["subnets"]["cifar"]["file"] == "ViT-B_prompt_cifar100.yaml"
    assert layouts["dtd"]["lora_rank"] == [10, 5, 1, 1, 5, 10, 5, 1, 1, 5, 1, 1]
    assert layouts["oxford_iiit_pet"]["adapter_dim"] == [1, 5, 5, 5, 5, 10, 1, 5, 10, 1, 1, 5]


def noah_reported_count(layout: dict[str, list[int]], dim: int) -> int:
    """NOAH's `get_sampled_params_numel(config)` for a retrain config, re-implemented on meta tensors of NOAH's
    shapes: the sliced LoRA_a / LoRA_b (Attention.calc_sampled_param_num), each block's visual_prompt_token slice
    (Block), the sliced adapter (AdapterSuper, its ln2 bias whole), plus the model's own visual_prompt_token
    slice and its whole positional embedding (IS_not_position_VPT is off in the retrain script). No head."""
    with torch.device("meta"):
        lora_a, lora_b = torch.empty(SUPERNET, dim), torch.empty(3 * dim, SUPERNET)
        prompt, pos = torch.empty(1, SUPERNET, dim), torch.empty(1, SUPERNET, dim)
        ln1_w, ln1_b, ln2_w, ln2_b = (
            torch.empty(SUPERNET, dim),
            torch.empty(SUPERNET),
            torch.empty(dim, SUPERNET),
            torch.empty(dim),
        )
    total = 0
    for p, r, a in zip(layout["prompt_len"], layout["lora_rank"], layout["adapter_dim"], strict=True):
        total += lora_a[:r, :].numel() + lora_b[:, :r].numel() if r else 0
        total += prompt[:, :p, :].numel() if p else 0
        total += ln1_w[:a, :].numel() + ln1_b[:a].numel() + ln2_w[:, :a].numel() + ln2_b.numel() if a else 0
    first = layout["prompt_len"][0]
    return total + (prompt[:, :first, :].numel() + pos.numel() if first else 0)


# NOAH's printed subnet size (no head) at ViT-B/16, worked out by hand from its code (docs/methods.md, "NOAH")
NOAH_REPORTS = {"cifar": 404_810, "dtd": 371_778, "kitti": 475_456, "svhn": 516_166}


@pytest.mark.parametrize("task", sorted(NOAH_REPORTS))
def test_trainable_count_is_what_noahs_code_reports_on_vit_b16(task: str) -> None:
    d, classes = 768, 100
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), classes)
    tuned = build_tuned_model(backbone, make_tuner("noah", {"subnet": task}))
    assert tuned.params_added == noah_reported_count(subnets()[task], d) == NOAH_REPORTS[task]
    assert tuned.params_trainable == NOAH_REPORTS[task] + d * classes + classes


def test_a_shallower_model_takes_the_first_blocks_and_a_deeper_one_is_refused() -> None:
    shallow = build_backbone(TINY_BACKBONE, 10)  # 3 blocks: the cifar subnet's first three entries
    tuned = build_tuned_model(shallow, make_tuner("noah", {"subnet": "cifar"}))
    d = 64
    prompts, ranks, widths = CIFAR_FIRST_BLOCKS
    expected = sum(prompts) * d + 4 * d * sum(ranks) + sum(2 * d * a + a + d for a in widths)
    assert tuned.params_added == expected + prompts[0] * d + SUPERNET * d
    deep = build_backbone(TINY_BACKBONE.model_copy(update={"kwargs": {"patch_size": 8, "depth": 13}}), 10)
    with pytest.raises(TunerError, match=r"^noah: the backbone has 13 blocks, the layout 12 entries; give") as info:
        build_tuned_model(deep, make_tuner("noah", {}))
    assert "\n" not in str(info.value)


def test_averaging_models_never_pool_the_prompts() -> None:
    """Without a class token the head averages the tokens: the prompts (3 + 2 left by CARRY) are dropped first."""
    spec = TINY_BACKBONE.model_copy(
        update={"kwargs": {"patch_size": 8, "depth": 3, "class_token": False, "global_pool": "avg"}}
    )
    backbone = build_backbone(spec, 10)
    seen: list[int] = []
    backbone.norm.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    knobs = {"subnet": None, "prompt_len": CARRY[0], "lora_rank": CARRY[1], "adapter_dim": CARRY[2]}
    tuned = build_tuned_model(backbone, make_tuner("noah", knobs))
    tuned.module(torch.randn(2, 3, 32, 32))
    assert seen == [16]  # the 16 patches only
