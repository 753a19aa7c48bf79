"""What only a GPU can show: CUDA allocator peaks, their reset, NVML, CUDA-event timing, the attention kernel.

Run on a CUDA machine with `pytest -m gpu` (or scripts/gpu-check.sh). Without a GPU these tests fail loudly
instead of skipping; CI deselects them with `-m "not gpu"`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from petlbench.results import RunResult
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite

pytestmark = pytest.mark.gpu

VITB = {
    "name": "gpu-test",
    "device": "cuda",
    "backbone": {"model": "vit_base_patch16_224"},
    "data": {"name": "synthetic", "num_classes": 100},
    "batch_size": 16,
    "measure": {"warmup_steps": 2, "steps": 5},
    "tuners": [{"tuner": "lora", "params": {"rank": 8}}],
}


@pytest.fixture(autouse=True)
def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("GPU test run without a CUDA device; deselect with -m 'not gpu'")


def run(**overrides: Any) -> RunResult:
    spec = expand(parse_suite({**VITB, **overrides}), "cuda")[0]
    result = execute(spec)
    assert result.status == "ok", result.error
    return result


def test_cuda_views_of_the_peak_are_consistent() -> None:
    m = run().metrics
    assert m.memory_source == "cuda_allocator"
    assert m.peak_allocated_bytes and m.peak_reserved_bytes and m.mem_tracked_peak_bytes
    assert m.peak_reserved_bytes >= m.peak_allocated_bytes
    # the tracker sees tensors only; the allocator also serves cuBLAS/cuDNN workspaces
    assert 0.75 * m.peak_allocated_bytes <= m.mem_tracked_peak_bytes <= m.peak_allocated_bytes
    parts = (m.mem_weights_bytes, m.mem_grads_bytes, m.mem_optimizer_bytes, m.mem_activations_bytes)
    assert sum(p or 0 for p in parts) == m.mem_tracked_peak_bytes
    assert m.peak_driver_bytes is not None and m.driver_memory_scope in ("process", "device")
    if m.driver_memory_scope == "process":
        assert m.peak_driver_bytes >= m.peak_reserved_bytes  # NVML adds the CUDA context on top
    assert m.step_time_median_s and m.step_time_p90_s and m.step_time_p90_s >= m.step_time_median_s
    assert m.peak_infer_bytes and m.peak_infer_bytes < m.peak_allocated_bytes


def test_peak_is_reset_before_the_measured_steps() -> None:
    baseline = run().metrics.peak_allocated_bytes
    big = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda")  # 4 GiB, freed before the run
    del big
    assert run().metrics.peak_allocated_bytes == baseline


def test_attention_kernel_is_recorded_and_follows_fused_attn() -> None:
    fused = run().metrics.attn_kernel
    assert fused in ("flash", "efficient", "cudnn"), fused
    plain = run(backbone={"model": "vit_base_patch16_224", "fused_attn": False}).metrics.attn_kernel
    assert plain == "math"


def test_mixed_precision_lowers_the_peak() -> None:
    fp32 = run().metrics.peak_allocated_bytes or 0
    assert (run(precision="bf16-mixed").metrics.peak_allocated_bytes or 0) < fp32
    assert (run(precision="fp16-mixed").metrics.peak_allocated_bytes or 0) < fp32


def test_full_above_lora_above_linear_on_cuda() -> None:
    peaks = {
        name: run(tuners=[{"tuner": name}]).metrics.peak_allocated_bytes or 0 for name in ("full", "lora", "linear")
    }
    assert peaks["full"] > peaks["lora"] > peaks["linear"]
