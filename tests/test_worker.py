"""The worker's protocol, run in-process on the tiny ViT: what a row contains and how failures are classified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from petlbench.backbone import build_backbone
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from tests.conftest import TINY_BACKBONE

TINY = {
    "name": "unit",
    "device": "cpu",
    "data": {"name": "synthetic", "num_classes": 10},
    "backbone": TINY_BACKBONE.model_dump(),
    "batch_size": 8,
    "measure": {"warmup_steps": 2, "steps": 2},
    "tuners": [{"tuner": "lora", "params": {"rank": 4}}],
}


def spec(**overrides: Any) -> RunSpec:
    return expand(parse_suite({**TINY, **overrides}), "cpu")[0]


def test_ok_run_fills_every_cpu_metric() -> None:
    result = execute(spec())
    assert result.status == "ok", result.error
    m = result.metrics
    assert m.memory_source == "cpu_tracker"
    assert m.params_trainable is not None and m.params_added is not None and 0 < m.params_added < m.params_trainable
    parts = [m.mem_weights_bytes, m.mem_grads_bytes, m.mem_optimizer_bytes, m.mem_activations_bytes]
    assert all(p is not None for p in parts)
    assert sum(p for p in parts if p is not None) == m.peak_allocated_bytes == m.mem_tracked_peak_bytes
    assert m.peak_infer_bytes is not None and 0 < m.peak_infer_bytes < (m.peak_allocated_bytes or 0)
    assert m.step_time_median_s and m.step_time_p90_s and m.step_time_median_s <= m.step_time_p90_s
    assert m.train_images_per_s == pytest.approx(8 / m.step_time_median_s)
    assert m.attn_kernel == "cpu_flash"
    assert m.peak_reserved_bytes is None and m.peak_driver_bytes is None  # no CUDA here: never made up
    assert m.acc_top1 is None  # this suite does not train
    assert result.env["torch"] == torch.__version__ and result.env["timm"]


def test_same_spec_gives_the_same_tracked_peak() -> None:
    first, second = execute(spec()), execute(spec())
    assert first.metrics.peak_allocated_bytes == second.metrics.peak_allocated_bytes
    assert first.metrics.mem_activations_bytes == second.metrics.mem_activations_bytes


def test_training_phase_records_accuracy() -> None:
    result = execute(spec(data={"name": "digits"}, train={"epochs": 2, "eval_every": 1}, tuners=[{"tuner": "linear"}]))
    assert result.status == "ok", result.error
    m = result.metrics
    assert m.acc_top1 is not None and 0.0 <= m.acc_top1 <= 1.0
    assert m.acc_top1_best is not None and m.acc_top1_best >= m.acc_top1
    assert m.acc_best_epoch in (1, 2) and m.epochs == 2
    assert m.num_train and m.num_test and m.num_train + m.num_test == 1797


def test_fp16_on_cpu_is_a_config_error_row() -> None:
    result = execute(spec(precision="fp16-mixed"))
    assert result.status == "error"
    assert result.error is not None and "fp16-mixed needs device cuda" in result.error


def test_bf16_mixed_runs_on_cpu() -> None:
    result = execute(spec(precision="bf16-mixed"))
    assert result.status == "ok", result.error


def test_rank_larger_than_the_model_is_a_tuner_error() -> None:
    result = execute(spec(tuners=[{"tuner": "lora", "params": {"rank": 4096}}]))
    assert result.status == "error"
    assert result.error is not None and "tuner.rank 4096 exceeds the qkv width 64" in result.error


def test_missing_checkpoint_says_how_to_fix() -> None:
    result = execute(spec(backbone={**TINY_BACKBONE.model_dump(), "weights": "/nope/model.safetensors"}))
    assert result.status == "error"
    assert result.error is not None and "backbone.weights" in result.error and "no such checkpoint" in result.error


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_reproduces_logits(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    source = build_backbone(TINY_BACKBONE, 10).eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(4)  # a different random init, overwritten by the checkpoint
    loaded = build_backbone(TINY_BACKBONE.model_copy(update={"weights": str(path)}), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
