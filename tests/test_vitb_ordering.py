"""Issue acceptance at the real model size: ViT-B/16, 100 classes, batch 8, fp32, AdamW, fused attention.

Uses the fake-tensor estimate, which equals the real CPU measurement to the byte (tests/test_estimate.py proves it
for every tuner on a small ViT; tests/test_vitb_memory.py checks full fine-tuning here against MEASURE-NOTES).
"""

from __future__ import annotations

import pytest

from petlbench.columns import Metrics
from petlbench.estimate.engine import estimate_memory
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite

pytestmark = pytest.mark.slow

SUITE = {
    "name": "vitb-order",
    "device": "cpu",
    "backbone": {"model": "vit_base_patch16_224"},
    "data": {"name": "synthetic", "num_classes": 100},
    "batch_size": 8,
    "measure": {"warmup_steps": 2, "steps": 1, "inference": False},
    "tuners": [
        {"tuner": "full"},
        {"tuner": "vpt", "params": {"deep": True, "prompt_len": 50}},
        {"tuner": "lora", "params": {"rank": 8}},
        {"tuner": "fact", "params": {"variant": "tt", "rank": 8}},
        {"tuner": "sqt", "params": {"num_queries": 4}},
        {"tuner": "linear"},
    ],
}


@pytest.fixture(scope="module")
def measured() -> dict[str, Metrics]:
    return {spec.label().split(" bs=")[0]: estimate_memory(spec) for spec in expand(parse_suite(SUITE), "cpu")}


def test_peak_ordering(measured: dict[str, Metrics]) -> None:
    peak = {name: m.peak_allocated_bytes or 0 for name, m in measured.items()}
    full, vpt, lora = peak["full"], peak["vpt-deep prompt_len=50"], peak["lora rank=8"]
    fact, sqt, linear = peak["fact-tt rank=8"], peak["sqt num_queries=4"], peak["linear"]
    assert full > vpt > lora
    assert full > fact > lora  # FacT keeps full-FT-sized activations: its fc2 delta needs the 4·D GELU output
    assert min(lora, fact) > sqt > linear
    assert full == 2_000_061_800  # MEASURE-NOTES.md §4, measured on real tensors


def test_breakdowns_add_up(measured: dict[str, Metrics]) -> None:
    for name, m in measured.items():
        parts = (m.mem_weights_bytes, m.mem_grads_bytes, m.mem_optimizer_bytes, m.mem_activations_bytes)
        assert sum(p or 0 for p in parts) == m.peak_allocated_bytes, name


def test_sqt_keeps_a_quarter_of_loras_activations(measured: dict[str, Metrics]) -> None:
    sqt = measured["sqt num_queries=4"].mem_activations_bytes or 0
    lora = measured["lora rank=8"].mem_activations_bytes or 0
    # K/V of every block (24 token tensors per sample) are the floor of the method: ~23 % of LoRA's
    assert sqt <= 0.25 * lora
