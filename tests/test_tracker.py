"""The tensor tracker: exact bytes, categories that sum to the peak, frees, views and retagging."""

from __future__ import annotations

import torch

from petlbench.measure.memory import tracked_train_step
from petlbench.measure.step import TrainStep, make_optimizer
from petlbench.measure.tracker import TensorTracker, attention_kernel
from petlbench.spec.models import OptimizerSpec
from petlbench.tuners import make_tuner
from petlbench.tuners.base import build_tuned_model
from tests.conftest import TinyVitFactory


def test_counts_storages_once_frees_and_peaks() -> None:
    tracker = TensorTracker()
    with tracker:
        a = torch.ones(1000)  # 4,000 B
        view = a[10:20]  # a view shares the storage: no new bytes
        b = torch.ones(500, dtype=torch.float64)  # 4,000 B
        del b
        c = torch.ones(250)  # 1,000 B
    assert tracker.peak == 8000
    assert tracker.total == 5000
    assert tracker.peak_by_category == {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 8000}
    del a, view, c
    assert tracker.total == 0


def test_register_retag_and_rounding() -> None:
    weight = torch.zeros(100)
    tracker = TensorTracker(round_to=512)
    tracker.register([weight], "weights")
    assert tracker.total == 512
    with tracker:
        grad = torch.ones(10)
    tracker.retag(grad, "gradients")
    assert tracker.live["gradients"] == 512 and tracker.live["activations"] == 0
    assert tracker.peak_by_category["activations"] == 512  # at the peak moment it was not yet a gradient


def test_attention_kernel_names() -> None:
    assert attention_kernel({"_scaled_dot_product_flash_attention_for_cpu"}) == "cpu_flash"
    assert attention_kernel({"_scaled_dot_product_efficient_attention", "_softmax"}) == "efficient"
    assert attention_kernel({"_softmax", "_softmax_backward_data"}) == "math"
    assert attention_kernel({"_scaled_dot_product_flash_attention_backward"}) is None


def _tracked(tiny_vit: TinyVitFactory, tuner: str, fused: bool = True) -> tuple[int, dict[str, int], str | None]:
    tuned = build_tuned_model(tiny_vit(fused_attn=fused), make_tuner(tuner, {}))
    optimizer = make_optimizer(tuned.trainable_parameters(), OptimizerSpec())
    step = TrainStep(tuned.module, optimizer, "fp32", "cpu")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(10, (8,), generator=generator)
    step(x, y)
    step(x, y)
    result = tracked_train_step(step, x, y)
    return result.peak_bytes, result.by_category, result.attn_kernel


def test_training_step_breakdown_sums_to_peak_and_is_deterministic(tiny_vit: TinyVitFactory) -> None:
    peak, parts, kernel = _tracked(tiny_vit, "full")
    assert sum(parts.values()) == peak
    assert kernel == "cpu_flash"
    params = list(tiny_vit().parameters())
    # AdamW: exp_avg + exp_avg_sq per parameter, plus one 4-byte `step` tensor each
    assert parts["optimizer"] == 2 * sum(p.numel() * 4 for p in params) + 4 * len(params)
    assert _tracked(tiny_vit, "full") == (peak, parts, kernel)


def test_frozen_backbone_has_no_gradients_or_optimizer_state(tiny_vit: TinyVitFactory) -> None:
    peak_linear, parts_linear, _ = _tracked(tiny_vit, "linear")
    peak_full, _, _ = _tracked(tiny_vit, "full")
    head = tiny_vit().get_classifier()
    head_bytes = sum(p.numel() * 4 for p in head.parameters())
    assert parts_linear["optimizer"] == 2 * head_bytes + 4 * len(list(head.parameters()))
    assert peak_linear < peak_full
    _, _, kernel = _tracked(tiny_vit, "linear", fused=False)
    assert kernel == "math"
