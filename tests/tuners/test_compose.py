"""Compose: parts validated by their own tuner models, impossible combinations refused in one line without torch,
every accepted pair of built-in tuners attached and trained, the computation equal to the parts attached by hand,
and the trainable count equal to the sum of the parts' formulas (on ViT-B/16, and in a CPU run end to end)."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from petlbench.backbone import build_backbone
from petlbench.cli.app import app
from petlbench.errors import ConfigError
from petlbench.results import load_results
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import BackboneSpec
from petlbench.tuners import TUNERS, make_tuner
from petlbench.tuners.base import build_tuned_model
from petlbench.tuners.compose import attach_order, conflicts
from tests.conftest import TINY_BACKBONE, TINY_CLASSES, TinyVitFactory

Batch = tuple[torch.Tensor, torch.Tensor]
LORA_VPT_BITFIT: list[dict[str, Any]] = [
    {"tuner": "lora", "params": {"rank": 8}},
    {"tuner": "vpt", "params": {"prompt_len": 10}},
    {"tuner": "bitfit"},
]
runner = CliRunner()


def suite(parts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": "compose",
        "device": "cpu",
        "backbone": TINY_BACKBONE.model_dump(),
        "data": {"name": "synthetic", "num_classes": TINY_CLASSES},
        "batch_size": 4,
        "tuners": [{"tuner": "compose", "params": {"parts": parts, **extra}}],
    }


def refusal(parts: list[dict[str, Any]]) -> str:
    with pytest.raises(ConfigError) as info:
        expand(parse_suite(suite(parts), source="s.yaml"), "cpu")
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- validation, torch-free ---------------------------------------------------------------------------------------


def test_the_row_records_every_part_a_label_and_the_headline_knob() -> None:
    (spec,) = expand(parse_suite(suite(LORA_VPT_BITFIT)), "cpu")
    assert spec.tuner == "compose" and spec.method == "lora+vpt-deep+bitfit"
    assert (spec.knob_name, spec.knob) == ("lora.rank", 8.0)  # the first part with a headline knob
    lora, vpt, bitfit = spec.tuner_params["parts"]
    assert lora == {"tuner": "lora", "params": {"rank": 8, "alpha": None, "targets": ["q", "v"], "dropout": 0.0}}
    assert vpt["params"] == {"prompt_len": 10, "deep": True, "dropout": 0.0}  # defaults written out
    assert bitfit == {"tuner": "bitfit", "params": {}}
    assert (spec.tuner_params["backbone_mode"], spec.tuner_params["head_init"]) == ("train", "timm")  # lora's
    other = suite([{**LORA_VPT_BITFIT[0], "params": {"rank": 4}}, *LORA_VPT_BITFIT[1:]])
    assert expand(parse_suite(other), "cpu")[0].run_id != spec.run_id  # a part's knob is in the run_id
    first_vpt = expand(parse_suite(suite([LORA_VPT_BITFIT[1], LORA_VPT_BITFIT[0]])), "cpu")[0]
    assert (first_vpt.tuner_params["backbone_mode"], first_vpt.tuner_params["head_init"]) == ("eval", "vpt")


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            [{"tuner": "lora", "params": {"rnak": 8}}, {"tuner": "vpt"}],
            "s.yaml: tuners[0].params.parts[0].params.rnak: unknown knob for tuner 'lora'; did you mean 'rank'? "
            "valid: rank, alpha, targets, dropout",
        ),
        (
            [{"tuner": "lroa"}, {"tuner": "vpt"}],
            "s.yaml: tuners[0].params.parts[0].tuner: unknown tuner 'lroa'; did you mean 'lora'? valid: ",
        ),
        (
            [{"tuner": "lora", "params": {"rank": 0}}, {"tuner": "vpt"}],
            "s.yaml: tuners[0].params.parts[0].params.rank: Input should be greater than 0, got 0",
        ),
        (
            [{"tuner": "lora", "params": {"head_init": "torch"}}, {"tuner": "vpt"}],
            "s.yaml: tuners[0].params.parts[0].params.head_init: set head_init on compose itself",
        ),
        (
            [{"tuner": "lora"}, {"tuner": "fact"}],
            "s.yaml: tuners[0].params.parts: parts[0] (lora) and parts[1] (fact) both replace blocks.*.attn.qkv; "
            "keep one of them",
        ),
        (
            [{"tuner": "bitfit"}, {"tuner": "dtl"}],
            "s.yaml: tuners[0].params.parts: parts[1] (dtl) is a side network that reads the frozen backbone, and "
            "parts[0] (bitfit) changes that backbone (trains backbone parameters); keep one of them",
        ),
        (
            [{"tuner": "vqt"}, {"tuner": "sqt"}],
            "s.yaml: tuners[0].params.parts: parts[0] (vqt) and parts[1] (sqt) are both side networks that feed the "
            "classifier features of their own (two heads)",
        ),
        (
            [{"tuner": "adapter"}, {"tuner": "noah"}],
            "parts[0] (adapter) cannot reach blocks.*.mlp inside the blocks.* that parts[1] (noah) changes",
        ),
        ([{"tuner": "lora"}, {"tuner": "lora"}], "parts[1] (lora): already parts[0]"),
        ([{"tuner": "lora"}, {"tuner": "peft"}], "parts[1] (peft): peft cannot be a compose part: peft picks"),
        ([{"tuner": "lora"}, {"tuner": "compose"}], "parts[1] (compose): a composition cannot be a part"),
        ([{"tuner": "bitfit"}, {"tuner": "full"}], "no part adds parameters (bitfit, full)"),
        ([{"tuner": "lora"}], "a composition needs at least two parts, got 1; for one, use tuner: lora"),
        ([{"tuner": "lora", "param": {}}, {"tuner": "vpt"}], "parts[0].param: unknown key; valid keys: params, tuner"),
    ],
)
def test_impossible_or_mistyped_compositions_are_one_line_errors(parts: list[dict[str, Any]], message: str) -> None:
    assert message in refusal(parts)


def test_validate_refuses_an_impossible_combination_in_one_line(tmp_path: Path) -> None:
    """The parent process validates compositions without importing torch."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ndevice: cpu\nbackbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 2}}\n"
        "data: {name: synthetic, num_classes: 10}\ntuners:\n"
        "  - tuner: compose\n    params: {parts: [{tuner: ssf}, {tuner: lora}]}\n"
    )
    outcome = runner.invoke(app, ["validate", str(path), "--no-preflight"])
    assert outcome.exit_code == 2
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    assert lines == [
        f"error: {path}: tuners[0].params.parts: parts[0] (ssf) and parts[1] (lora) both replace "
        "blocks.*.attn.qkv; keep one of them"
    ]
    good = tmp_path / "good.yaml"
    good.write_text(path.read_text().replace("{tuner: ssf}", "{tuner: bitfit}"))
    probe = (
        "import sys; from petlbench.spec.loading import load_suite; from petlbench.spec.expand import expand\n"
        f"assert expand(load_suite({str(good)!r}), 'cpu')[0].method == 'bitfit+lora'\n"
        "assert 'torch' not in sys.modules, 'validation imported torch'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_attach_order_puts_the_innermost_module_first() -> None:
    """LoRA's qkv before the adapter's MLP before AdaptFormer's block before VPT's wrap of the block."""
    classes = [TUNERS[n] for n in ("vpt", "adaptformer", "adapter", "bitfit", "lora")]
    assert [classes[i].name for i in attach_order(classes)] == ["lora", "adapter", "adaptformer", "vpt", "bitfit"]


# -- the torch side -------------------------------------------------------------------------------------------------


def composable() -> list[str]:
    return [n for n, c in sorted(TUNERS.items()) if c.replaces is not None and n != "compose"]


def test_every_pair_is_refused_in_one_line_or_attaches_and_trains(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """Exhaustive over the built-in tuners: what validation accepts works on a tiny ViT (forward, gradients to
    exactly the trainable parameters), with the parts' added parameters summed and their backbone choices united."""
    torch.set_num_threads(1)
    x, y = tiny_batch

    def trained_backbone_names(backbone: torch.nn.Module, tuner: Any) -> tuple[int, set[str]]:
        names = {id(p): n for n, p in backbone.named_parameters()}  # before attach: the backbone's own
        tuned = build_tuned_model(backbone, tuner)
        model = tuned.module.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for pname, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, f"{tuner.method()}: {pname}"
        return tuned.params_added, {names[id(p)] for p in model.parameters() if p.requires_grad and id(p) in names}

    alone = {name: trained_backbone_names(tiny_vit(), make_tuner(name, {})) for name in composable()}
    accepted = 0
    for a, b in itertools.combinations(composable(), 2):
        problem = conflicts([TUNERS[a], TUNERS[b]])
        if problem is not None:
            assert "\n" not in problem and (f"({a})" in problem or "no part adds" in problem), problem
            continue
        accepted += 1
        added, trained = trained_backbone_names(
            tiny_vit(), make_tuner("compose", {"parts": [{"tuner": a}, {"tuner": b}]})
        )
        assert trained == alone[a][1] | alone[b][1], f"{a}+{b}"
        assert added == alone[a][0] + alone[b][0], f"{a}+{b}"
    assert accepted >= 20  # most pairs of non-side tuners work together


def test_the_composition_computes_the_parts_attached_by_hand(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """LoRA + VPT + BitFit equals LoRA then VPT attached to one backbone by hand, value for value, and trains the
    union of what the parts train."""
    backbone = tiny_vit()
    original = {id(p) for p in backbone.parameters()}
    expected = {id(p) for n, p in backbone.named_parameters() if n.endswith("bias") or n.startswith("head.")}
    torch.manual_seed(3)
    tuned = build_tuned_model(backbone, make_tuner("compose", {"parts": LORA_VPT_BITFIT}))
    by_hand = tiny_vit()
    torch.manual_seed(3)
    for part in LORA_VPT_BITFIT[:2]:  # attach order: LoRA's qkv, then VPT around the blocks; BitFit adds nothing
        make_tuner(part["tuner"], part.get("params", {})).attach(by_hand)
    by_hand.head.load_state_dict(tuned.backbone.head.state_dict())
    ours = dict(tuned.module.named_parameters())
    with torch.no_grad():
        for n, p in by_hand.named_parameters():
            assert torch.equal(p, ours[n]), n
            if "lora_B" in n:  # zero at init: make the deltas count
                p.normal_(0, 0.1)
                ours[n].copy_(p)
    x = tiny_batch[0]
    tuned.module.eval()
    by_hand.eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned.module(x), by_hand(x), rtol=0, atol=0)
    added = {id(p) for p in tuned.module.parameters() if id(p) not in original}
    assert len(added) == 3 * 2 * 2 + 3  # per block an A and a B for q and v, and a prompt set
    assert {id(p) for p in tuned.trainable_parameters()} == added | expected


def test_trainable_count_is_the_sum_of_the_parts_formulas_on_vit_b16() -> None:
    """LoRA r8 on q, v: 2·L·2·D·r; deep VPT p10: L·p·D; BitFit: 2D + L·(7D + H) biases; the 100-class head."""
    d, layers, hidden, classes = 768, 12, 3072, 100
    lora, vpt, bitfit, head = 2 * layers * 2 * d * 8, layers * 10 * d, 2 * d + layers * (7 * d + hidden), d * 100 + 100
    assert (lora, vpt, bitfit) == (294_912, 92_160, 102_912)  # the single tuners' documented counts
    with torch.device("meta"):
        backbone = build_backbone(BackboneSpec(), classes)
    tuned = build_tuned_model(backbone, make_tuner("compose", {"parts": LORA_VPT_BITFIT}))
    assert tuned.params_added == lora + vpt
    assert tuned.params_trainable == lora + vpt + bitfit + head == 566_884


@pytest.mark.slow
def test_a_compose_suite_runs_estimates_and_explains_on_cpu(tmp_path: Path) -> None:
    """`petlbench run` end to end (worker subprocess, measured memory breakdown), then `estimate` predicting the
    same peak, `explain` and `report` reading the row by its method label."""
    data = suite(LORA_VPT_BITFIT)
    data["measure"] = {"warmup_steps": 2, "steps": 1, "inference": False, "cpu_threads": 1}
    path = tmp_path / "compose.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    outcome = runner.invoke(app, ["run", str(path), "--results-dir", str(results)])
    assert outcome.exit_code == 0, outcome.output
    (row,) = load_results([results]).to_dict("records")
    assert row["status"] == "ok" and row["method"] == "lora+vpt-deep+bitfit" and row["knob_name"] == "lora.rank"
    assert '"tuner": "vpt"' in row["tuner.parts"]
    d, layers, hidden = 64, 3, 192  # test_vit at depth 3: embed 64, MLP 192
    lora, vpt, bitfit = 2 * layers * 2 * d * 8, layers * 10 * d, 2 * d + layers * (7 * d + hidden)
    assert row["params_trainable"] == lora + vpt + bitfit + d * TINY_CLASSES + TINY_CLASSES
    assert row["mem_activations_bytes"] > 0 and row["mem_weights_bytes"] > 0
    estimate = runner.invoke(app, ["estimate", str(path), "--results-dir", str(results), "--jobs", "1"])
    assert estimate.exit_code == 0, estimate.output
    (predicted,) = load_results([results / "compose.estimate"]).to_dict("records")
    assert predicted["peak_allocated_bytes"] == row["peak_allocated_bytes"]
    explained = runner.invoke(app, ["explain", str(results / "compose"), "--method", "lora+vpt-deep+bitfit"])
    assert explained.exit_code == 0, explained.output
    assert "lora+vpt-deep+bitfit" in explained.output
    report = runner.invoke(app, ["report", str(results / "compose"), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "lora+vpt-deep+bitfit" in (tmp_path / "report" / "report.md").read_text()


def test_deepcopied_compose_keeps_working(tiny_vit: TinyVitFactory, tiny_batch: Batch) -> None:
    """The pre-flight probe builds on a deep copy of the backbone: the tuner object is reused once per build."""
    tuner = make_tuner("compose", {"parts": LORA_VPT_BITFIT})
    first = build_tuned_model(tiny_vit(), tuner)
    second = build_tuned_model(copy.deepcopy(tiny_vit()), tuner)
    assert first.params_trainable == second.params_trainable
