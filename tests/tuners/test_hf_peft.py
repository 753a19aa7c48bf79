"""The peft bridge: checked against petlbench's native LoRA on a ViT whose qkv is split into q, k, v, against
parameter-count formulas, peft's own defaults, merge, and the fake-tensor estimate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from petlbench.backbone import build_backbone
from petlbench.errors import ConfigError
from petlbench.estimate.engine import estimate_memory
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import TunedModel, build_tuned_model
from petlbench.tuners.hf_peft import RANK_FIELDS, Peft
from petlbench.tuners.hf_peft.layers import PeftFieldError, PeftNeedsWeights
from petlbench.tuners.lora.layers import LoraQkv
from tests.conftest import TINY_BACKBONE, TinyVitFactory

Batch = tuple[torch.Tensor, torch.Tensor]
ROOT = Path(__file__).resolve().parents[2]

# Six peft methods on the tiny ViT, configured as in suites/peft.yaml (sizes that divide the tiny widths).
METHODS: dict[str, dict[str, object]] = {
    "lora": {"peft_type": "LORA", "config": {"r": 4, "lora_alpha": 8}},
    "dora": {"peft_type": "LORA", "config": {"r": 4, "lora_alpha": 8, "use_dora": True}},
    "loha": {"peft_type": "LOHA", "config": {"r": 4, "alpha": 8, "target_modules": ["qkv", "attn.proj", "fc1", "fc2"]}},
    "lokr": {"peft_type": "LOKR", "config": {"r": 4, "alpha": 8, "target_modules": ["qkv", "attn.proj", "fc1", "fc2"]}},
    "ia3": {"peft_type": "IA3", "config": {"target_modules": ["qkv", "fc2"], "feedforward_modules": ["fc2"]}},
    "vera": {"peft_type": "VERA", "config": {"r": 16}},
    "boft": {"peft_type": "BOFT", "config": {"boft_block_size": 4}},
    "oft": {"peft_type": "OFT", "config": {"oft_block_size": 16}},
}


class SplitQkv(nn.Module):
    """timm's fused qkv as three Linears holding its thirds, concatenated: a ViT with separate q, k, v."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        d = fused.out_features // 3
        self.q, self.k, self.v = (nn.Linear(fused.in_features, d, bias=fused.bias is not None) for _ in range(3))
        with torch.no_grad():
            for i, part in enumerate((self.q, self.k, self.v)):
                part.weight.copy_(fused.weight[i * d : (i + 1) * d])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * d : (i + 1) * d])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule("blocks").children())


def peft_tuned(backbone: nn.Module, **params: object) -> TunedModel:
    torch.manual_seed(1)
    return build_tuned_model(backbone, make_tuner("peft", params))


def test_peft_lora_on_split_q_and_v_is_native_lora(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """Same factors in both: same trainable count, logits and gradients. peft targets the split q and v Linears;
    the native tuner adds its q and v deltas to the thirds of the fused qkv."""
    rank, alpha = 4, 8  # LoraConfig types lora_alpha as int
    native = build_tuned_model(tiny_vit(), make_tuner("lora", {"rank": rank, "alpha": alpha, "targets": ["q", "v"]}))
    split = tiny_vit()
    for block in blocks(split):
        block.attn.qkv = SplitQkv(block.attn.qkv)
    bridged = peft_tuned(split, peft_type="LORA", config={"r": rank, "lora_alpha": alpha, "target_modules": ["q", "v"]})
    assert bridged.params_trainable == native.params_trainable
    assert bridged.params_added == native.params_added == len(blocks(split)) * 2 * rank * 2 * split.embed_dim

    generator = torch.Generator().manual_seed(3)
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
    with torch.no_grad():
        for ours, theirs in zip(blocks(native.module), blocks(bridged.module), strict=True):
            qkv = ours.attn.qkv
            assert isinstance(qkv, LoraQkv)
            for part in ("q", "v"):
                target = getattr(theirs.attn.qkv, part)
                for name in ("lora_A", "lora_B"):
                    mine, peft_w = qkv.get_submodule(f"{name}.{part}").weight, target.get_submodule(name).default.weight
                    mine.copy_(torch.randn(mine.shape, generator=generator) * 0.1)
                    peft_w.copy_(mine)
                    pairs.append((mine, peft_w))
    pairs.append((native.backbone.get_classifier().weight, bridged.backbone.get_classifier().weight))

    x, y = tiny_batch
    logits = []
    for tuned in (native, bridged):
        tuned.module.train()
        out = tuned.module(x)
        F.cross_entropy(out, y).backward()
        logits.append(out.detach())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for mine, peft_w in pairs:
        assert mine.grad is not None and peft_w.grad is not None
        assert mine.grad.abs().max() > 0
        torch.testing.assert_close(peft_w.grad, mine.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [4, 8])
def test_peft_lora_on_fused_qkv_trains_one_pair_per_block(tiny_vit: TinyVitFactory, rank: int) -> None:
    """One A (r×d) and one B (3d×r) per block: depth·r·(d + 3d), plus the head."""
    tuned = peft_tuned(tiny_vit(), r=rank)
    model = tuned.backbone
    qkv = blocks(model)[0].attn.qkv.base_layer
    head = sum(p.numel() for p in model.get_classifier().parameters())
    d, three_d = qkv.in_features, qkv.out_features
    assert three_d == 3 * d
    assert tuned.params_added == len(blocks(model)) * rank * (d + three_d)
    assert tuned.params_trainable == tuned.params_added + head


def test_peft_lora_on_vit_b16_counts() -> None:
    """ViT-B/16, 100 classes, LoRA r=8 on qkv: 12·8·(768 + 2304) + 76,900 (docs/methods.md, "peft")."""
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(model="vit_base_patch16_224"), 100)
        tuned = build_tuned_model(backbone, make_tuner("peft", {}))
    assert tuned.params_added == 12 * 8 * (768 + 3 * 768) == 294_912
    assert tuned.params_trainable == 294_912 + 768 * 100 + 100


def test_targets_follow_peft_matching_and_the_head_is_refused(tiny_vit: TinyVitFactory) -> None:
    """A list entry matches names ending in '.entry', a string is a full-match regex, and no target may be the
    classifier head (it trains in full; `all-linear` would include it)."""
    backbone = tiny_vit()
    d, rank = backbone.embed_dim, 4
    two = peft_tuned(backbone, r=rank, target_modules=r"blocks\.[01]\.attn\.qkv")
    assert two.params_added == 2 * rank * (d + 3 * d)
    for targets in (["qkv", "head"], "all-linear", "he.d"):
        with pytest.raises(PeftFieldError, match=r"config\.target_modules: matches the classifier head 'head'"):
            peft_tuned(tiny_vit(), target_modules=targets)
    with pytest.raises(PeftFieldError, match="'q_proj' matches no module of VisionTransformer") as caught:
        peft_tuned(tiny_vit(), target_modules=["qkv", "q_proj"])
    assert caught.value.config_field == "target_modules"
    with pytest.raises(PeftFieldError, match=r"the pattern 'blocks\.9\.qkv' matches no module name"):
        peft_tuned(tiny_vit(), target_modules="blocks.9.qkv")


def test_shipped_suite_trains_what_docs_methods_md_says() -> None:
    """suites/peft.yaml on ViT-B/16 (meta device), 100 classes: each method's count from its formula in ViT-B's
    numbers (D = 768, L = 12, MLP 3072, head 76,900); LoKr's factorisation has no one-line form."""
    d, depth, head = 768, 12, 768 * 100 + 100
    expected = {
        ("lora", 8.0): depth * 2 * (d * 8 + 8 * d),
        ("peft-lora", 4.0): depth * 4 * (d + 3 * d),
        ("peft-lora", 8.0): depth * 8 * (d + 3 * d),
        ("peft-lora", 16.0): depth * 16 * (d + 3 * d),
        ("peft-lora-dora", 8.0): depth * (8 * (d + 3 * d) + 3 * d),
        ("peft-loha", 8.0): depth * 2 * 8 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d)),
        ("peft-ia3", None): depth * (3 * d + 4 * d),
        ("peft-vera", 256.0): depth * (256 + 3 * d),
        ("peft-boft", 4.0): depth * (d * 4 + 3 * d),
        ("peft-oft", 32.0): depth * (d // 32) * (32 * 31 // 2),
    }
    runs = expand(load_suite(ROOT / "suites" / "peft.yaml"), "cpu")
    seen = set()
    for run in runs:
        with torch.device("meta"):
            backbone = build_backbone(run.backbone, 100)
            tuned = build_tuned_model(backbone, make_tuner(run.tuner, run.tuner_params))
        key = (run.method, run.knob)
        seen.add(key)
        if key in expected:
            assert tuned.params_added == expected[key], key
            assert tuned.params_trainable == expected[key] + head, key
    assert set(expected) <= seen and ("peft-lokr", 8.0) in seen


def linears(model: nn.Module, suffixes: tuple[str, ...]) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]


@pytest.mark.parametrize(
    ("method", "per_layer", "suffixes"),
    [
        ("loha", lambda lin, r: 2 * r * (lin.in_features + lin.out_features), ("qkv", "attn.proj", "fc1", "fc2")),
        ("dora", lambda lin, r: r * (lin.in_features + lin.out_features) + lin.out_features, ("qkv",)),
        ("vera", lambda lin, r: r + lin.out_features, ("qkv",)),
        ("boft", lambda lin, b: lin.in_features * b + lin.out_features, ("qkv",)),
    ],
)
def test_trainable_counts_follow_the_method_formulas(
    tiny_vit: TinyVitFactory, method: str, per_layer: object, suffixes: tuple[str, ...]
) -> None:
    """LoHa: two Hadamard factor pairs; DoRA: LoRA + a magnitude per output; VeRA: the two scaling vectors
    (the shared random A, B are frozen buffers); BOFT (one butterfly factor, block b): in/b blocks of b×b, plus
    a scale per output."""
    params = METHODS[method]
    backbone = tiny_vit()
    targets = linears(backbone, suffixes)
    tuned = peft_tuned(backbone, **params)
    knob = make_tuner("peft", params).knob_value()
    assert knob is not None and callable(per_layer)
    assert tuned.params_added == sum(per_layer(lin, int(knob)) for lin in targets)


def test_ia3_trains_a_vector_per_scaled_dimension(tiny_vit: TinyVitFactory) -> None:
    """IA3 scales qkv's outputs and, as a feed-forward module, fc2's inputs."""
    backbone = tiny_vit()
    qkv, fc2 = linears(backbone, ("qkv",)), linears(backbone, ("fc2",))
    tuned = peft_tuned(backbone, **METHODS["ia3"])
    assert tuned.params_added == sum(m.out_features for m in qkv) + sum(m.in_features for m in fc2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_is_identity_at_init_gets_gradients_and_merges(
    tiny_vit: TinyVitFactory, tiny_batch: Batch, method: str
) -> None:
    backbone = tiny_vit()
    reference = tiny_vit().eval()  # same seed, same weights
    original = {id(p) for p in backbone.parameters()}
    tuned = peft_tuned(backbone, **METHODS[method])
    x, y = tiny_batch
    tuned.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), reference(x), rtol=0, atol=1e-5)

    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move every adapter parameter off its init (zeros, ones, identity rotations)
        for p in tuned.module.parameters():
            if id(p) not in original:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    tuned.module.train()
    F.cross_entropy(tuned.module(x), y).backward()
    for name, p in tuned.module.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name

    tuned.module.eval()
    before = {k: v.clone() for k, v in tuned.backbone.state_dict().items()}
    with torch.no_grad():
        unmerged = tuned.module(x)
        assert (unmerged - reference(x)).abs().max() > 1e-4  # the perturbed adapters change the output
        tuned.tuner.merge(tuned.module)
        merged = tuned.module(x)
        tuned.tuner.unmerge(tuned.module)
        again = tuned.module(x)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=1e-5)
    for key, value in tuned.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-5)


def test_rank_fields_and_their_defaults_are_peft_own() -> None:
    """The headline knob of each method is a field of its peft config, with peft's default."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for peft_type, (field, default) in RANK_FIELDS.items():
        fields = {f.name: f for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)])}
        assert field in fields, (peft_type, field)
        assert fields[field].default == default, (peft_type, field, fields[field].default)
        assert make_tuner("peft", {"peft_type": peft_type, "config": {}}).knob_value() == default


def test_dropout_fields_of_the_shipped_methods_default_to_zero() -> None:
    """dropout_rates() reads only what the config says, so peft's defaults must be 0 for it to be complete."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for params in METHODS.values():
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(str(params["peft_type"]))]
        defaults = {f.name: f.default for f in dataclasses.fields(config_cls) if "dropout" in f.name}
        assert all(value == 0.0 for value in defaults.values()), (config_cls.__name__, defaults)


def test_knobs_beside_peft_type_move_into_config() -> None:
    tuner = Peft.model_validate({"peft_type": "lora", "r": 16, "config": {"lora_dropout": 0.1, "use_dora": True}})
    assert tuner.peft_type == "LORA"
    assert tuner.config == {"lora_dropout": 0.1, "use_dora": True, "r": 16, "target_modules": ["qkv"]}
    assert (tuner.method(), tuner.knob_name(), tuner.knob_value()) == ("peft-lora-dora", "r", 16.0)
    assert tuner.dropout_rates() == (0.1,)
    loha = Peft.model_validate({"peft_type": "LOHA", "config": {"rank_dropout": 0.2, "module_dropout": 0.1}})
    assert loha.dropout_rates() == (0.2, 0.1) and loha.method() == "peft-loha" and loha.knob_value() == 8.0
    ia3 = Peft.model_validate({"peft_type": "IA3"})
    assert (ia3.knob_name(), ia3.knob_value(), ia3.dropout_rates()) == (None, None, ())
    assert Peft.model_validate({"peft_type": "LORA", "r": "eight"}).knob_value() is None  # pre-flight reports it
    assert Peft.model_validate(tuner.model_dump(mode="json")) == tuner  # what a worker receives validates the same
    with pytest.raises(ValidationError, match="r: set both in config and beside it"):
        Peft.model_validate({"r": 4, "config": {"r": 8}})
    with pytest.raises(ValidationError, match="peft method name"):
        Peft.model_validate({"peft_type": "lo ra"})


def test_grid_sweeps_a_config_field_and_the_config_is_in_the_run_id() -> None:
    def suite(entry: dict[str, object]) -> dict[str, object]:
        return {
            "name": "p",
            "device": "cpu",
            "backbone": TINY_BACKBONE.model_dump(),
            "data": {"name": "synthetic", "num_classes": 10},
            "tuners": [entry],
        }

    dora = {"tuner": "peft", "params": {"peft_type": "LORA", "config": {"lora_alpha": 16, "use_dora": True}}}
    runs = expand(parse_suite(suite({**dora, "grid": {"r": [4, 8]}})), "cpu")
    assert [(r.method, r.knob_name, r.knob, r.tuner_params["config"]["r"]) for r in runs] == [
        ("peft-lora-dora", "r", 4.0, 4),
        ("peft-lora-dora", "r", 8.0, 8),
    ]
    assert runs[0].tuner_params["config"] == {"lora_alpha": 16, "use_dora": True, "target_modules": ["qkv"], "r": 4}
    other = expand(parse_suite(suite({**dora, "params": {"peft_type": "LORA", "config": {"lora_alpha": 32}}})), "cpu")
    plain = expand(parse_suite(suite({**dora, "params": {"peft_type": "LORA", "config": {"lora_alpha": 16}}})), "cpu")
    assert len({runs[0].run_id, runs[1].run_id, other[0].run_id, plain[0].run_id}) == 4
    clash = {"tuner": "peft", "params": {"config": {"r": 8}}, "grid": {"r": [4]}}
    with pytest.raises(ConfigError, match=r"tuners\[0\]: r: set both in config and beside it"):
        expand(parse_suite(suite(clash)), "cpu")


def test_the_probe_reports_fields_and_passes_methods_that_need_real_weights() -> None:
    """ADAMSS initialises from an SVD of the base weights: it cannot be built on the meta device (nor estimated),
    but its config is valid, so the pre-flight probe passes it; a bad field in the same suite is still found."""
    from petlbench.run.probe import probe

    def model(params: dict[str, object], entry: int) -> dict[str, object]:
        suite = {
            "name": "p",
            "device": "cpu",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": TINY_BACKBONE.model_dump(),
            "tuners": [{"tuner": "peft", "params": params}],
        }
        (run,) = expand(parse_suite(suite), "cpu")
        fields = {"grid": [], "task_params": [], "params": sorted(params), "task": "synthetic"}
        return {"backbone": 0, "where": f"tuners[{entry}]", "spec": run.model_dump(mode="json"), **fields}

    backbone = {"where": "backbone", "spec": TINY_BACKBONE.model_dump(mode="json")}
    request = {
        "backbones": [backbone],
        "models": [model({"peft_type": "ADAMSS"}, 0), model({"peft_type": "ADAMSS", "r": "x"}, 1)],
        "weights": [],
    }
    assert probe(request) == ["tuners[1].params.r: should be a valid integer (AdamssConfig), got 'x'"]
    good = Peft.model_validate({"peft_type": "ADAMSS"}).model_dump()
    with torch.device("meta"), pytest.raises(PeftNeedsWeights, match="ADAMSS initialises its adapters"):
        build_tuned_model(build_backbone(TINY_BACKBONE, 10), make_tuner("peft", good))


ESTIMATED = {name: METHODS[name] for name in ("loha", "boft", "vera")}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ESTIMATED))
def test_estimate_equals_real_cpu_measurement(method: str) -> None:
    """LoHa and BOFT decide in Python on a one-element random draw (module dropout, block dropout); VeRA's root is
    a PeftModel holding shared buffers. The fake-tensor estimate still matches a real run to the byte."""
    suite = parse_suite(
        {
            "name": "estimate",
            "device": "cpu",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": TINY_BACKBONE.model_dump(),
            "batch_size": 4,
            "measure": {"warmup_steps": 2, "steps": 1, "cpu_threads": 1},
            "tuners": [{"tuner": "peft", "params": ESTIMATED[method]}],
        }
    )
    (spec,) = expand(suite, "cpu")
    real = execute(spec)
    assert real.status == "ok", real.error
    predicted = estimate_memory(spec)
    for field in ("peak_allocated_bytes", "peak_infer_bytes", "mem_activations_bytes", "params_trainable"):
        assert getattr(predicted, field) == getattr(real.metrics, field), field
