"""Acceptance on the real model size: ViT-B/16 at batch 8 on CPU, measured (not estimated).

Full fine-tuning only: it anchors the fake-tensor estimates of tests/test_vitb_ordering.py (every tuner at this
size) to a real measurement, and MEASURE-NOTES.md §4 gives its exact peak."""

from __future__ import annotations

import pytest

from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite

pytestmark = pytest.mark.slow

SUITE = {
    "name": "vitb",
    "device": "cpu",
    "backbone": {"model": "vit_base_patch16_224"},
    "data": {"name": "synthetic", "num_classes": 100},
    "batch_size": 8,
    "measure": {"warmup_steps": 2, "steps": 1, "inference": False},
    "tuners": [{"tuner": "full"}],
}


def test_full_finetuning_peak_is_the_measured_one_and_its_breakdown_adds_up() -> None:
    (spec,) = expand(parse_suite(SUITE), "cpu")
    result = execute(spec)
    assert result.status == "ok", result.error
    m = result.metrics
    parts = (m.mem_weights_bytes, m.mem_grads_bytes, m.mem_optimizer_bytes, m.mem_activations_bytes)
    assert sum(p or 0 for p in parts) == m.peak_allocated_bytes
    # MEASURE-NOTES.md §4 measured full fine-tuning at exactly this setting
    assert m.peak_allocated_bytes == 2_000_061_800
    assert m.params_trainable == 85_875_556  # ViT-B/16 with a 100-class head (METHODS.md §6)
