"""The knobs every tuner has (head_init, backbone_mode): the init schemes, the defaults, the run_id, the estimator."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from petlbench.errors import TunerError
from petlbench.estimate.client import has_dropout
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from petlbench.tuners import TUNERS, describe_tuner, make_tuner
from petlbench.tuners.base import Tuner
from petlbench.tuners.layers import init_heads


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(48, 7)


def test_head_init_torch_is_what_a_fresh_nn_linear_draws() -> None:
    """timm 0.4.12's reset_classifier builds nn.Linear(D, C): the same draws as `reset_parameters` here."""
    head = linear()
    torch.manual_seed(5)
    init_heads([head], "torch", "x")
    torch.manual_seed(5)
    fresh = nn.Linear(48, 7)
    assert torch.equal(head.weight, fresh.weight) and torch.equal(head.bias, fresh.bias)


def test_head_init_vpt_is_kaiming_normal_fan_out_and_the_prior_bias() -> None:
    """KMnP/vpt src/models/mlp.py: kaiming_normal_(fan_out), bias -log((1 - 0.01) / 0.01)."""
    head = linear()
    torch.manual_seed(5)
    init_heads([head], "vpt", "x")
    torch.manual_seed(5)
    expected = torch.empty(7, 48).normal_(0.0, math.sqrt(2.0 / 7))  # gain √2 (ReLU, a=0) over fan_out = 7
    torch.testing.assert_close(head.weight.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(head.bias.detach(), torch.full((7,), math.log(0.01 / 0.99)))
    assert torch.sigmoid(head.bias[0]).item() == pytest.approx(0.01)


def test_head_init_refuses_a_head_it_cannot_initialise() -> None:
    init_heads([nn.Identity()], "vpt", "lora")  # num_classes=0: nothing to initialise
    with pytest.raises(TunerError, match=r"lora: tuner.head_init 'torch' needs an nn.Linear classifier.*timm"):
        init_heads([nn.Sequential(nn.Linear(4, 4))], "torch", "lora")


@pytest.mark.parametrize(
    ("name", "mode", "init"),
    [
        ("full", "train", "vpt"),  # the quoted Full rows come from VPT's code (end2end)
        ("linear", "eval", "vpt"),  # VPT's linear probe: frozen encoder switched to eval
        ("lora", "train", "timm"),  # NOAH's LoRA: model.train(), trunc-normal head
        ("vpt", "eval", "vpt"),
        ("fact", "train", "torch"),  # timm 0.4.12 reset_classifier, model.train()
        ("sqt", "train", "torch"),
        ("bitfit", "train", "torch"),  # PETL_Vision: timm 0.9.12's reset_classifier, a plain nn.Linear
        ("adapter", "train", "timm"),  # NOAH: model.train(), its reset_classifier's trunc-normal head
        ("adaptformer", "train", "adaptformer"),  # main_image.py: nn.Linear, weight re-drawn std 0.01
        ("noah", "train", "timm"),  # NOAH's retrain: model.train(), its reset_classifier
    ],
)
def test_defaults_follow_each_official_code(name: str, mode: str, init: str) -> None:
    tuner = TUNERS[name]()
    assert (tuner.backbone_mode, tuner.head_init) == (mode, init)
    rows = describe_tuner(TUNERS[name])
    assert [r["name"] for r in rows][-2:] == ["backbone_mode", "head_init"]  # own knobs first
    assert all(r["description"] for r in rows[-2:])


@pytest.mark.parametrize("bad", [{"backbone_mode": "frozen"}, {"head_init": "zeros"}])
def test_bad_values_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_tuner("lora", bad)


def run_spec(tuner: str, **params: Any) -> RunSpec:
    suite = parse_suite(
        {
            "name": "x",
            "device": "cpu",
            "backbone": {"model": "test_vit", "drop_rate": 0.1},
            "data": {"name": "synthetic", "num_classes": 10},
            "batch_size": 2,
            "tuners": [{"tuner": tuner, "params": params}],
        }
    )
    (spec,) = expand(suite, "cpu")
    return spec


def test_run_id_ignores_the_knobs_only_at_the_values_that_compute_what_petlbench_did_before() -> None:
    """backbone_mode 'train' + head_init 'timm' is the old computation: same run_id as a spec without the knobs."""
    lora = run_spec("lora")
    assert (lora.tuner_params["backbone_mode"], lora.tuner_params["head_init"]) == ("train", "timm")  # on the row
    without = {k: v for k, v in lora.tuner_params.items() if k not in ("backbone_mode", "head_init")}
    assert lora.model_copy(update={"tuner_params": without}).run_id == lora.run_id
    ids = {lora.run_id, run_spec("lora", head_init="torch").run_id, run_spec("lora", backbone_mode="eval").run_id}
    assert len(ids) == 3
    vpt = run_spec("vpt")
    assert vpt.model_copy(update={"tuner_params": {**vpt.tuner_params, "backbone_mode": "train"}}).run_id != vpt.run_id


def test_estimator_counts_backbone_dropout_only_when_the_backbone_trains() -> None:
    """drop_rate 0.1 in the suite: live for LoRA (train), off for VPT (eval) unless its own dropout is on."""
    assert has_dropout(run_spec("lora"))
    assert not has_dropout(run_spec("vpt"))
    assert has_dropout(run_spec("vpt", dropout=0.1))
    assert has_dropout(run_spec("vpt", backbone_mode="train"))


def test_a_plugin_tuner_gets_the_legacy_defaults() -> None:
    class Plain(Tuner):
        name = "plain"

        def attach(self, model: nn.Module) -> nn.Module:
            return model

    assert (Plain().backbone_mode, Plain().head_init) == ("train", "timm")
