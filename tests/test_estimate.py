"""The fake-tensor estimate equals the real CPU measurement to the byte, for every tuner, at two batch sizes."""

from __future__ import annotations

import pytest

from petlbench.estimate.engine import estimate_memory
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.tuners import TUNERS
from tests.conftest import TINY_BACKBONE

FIELDS = (
    "peak_allocated_bytes",
    "peak_infer_bytes",
    "mem_weights_bytes",
    "mem_grads_bytes",
    "mem_optimizer_bytes",
    "mem_activations_bytes",
    "params_trainable",
    "params_added",
    "attn_kernel",
)


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_estimate_equals_real_cpu_measurement(name: str) -> None:
    suite = parse_suite(
        {
            "name": "estimate",
            "device": "cpu",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": TINY_BACKBONE.model_dump(),
            "batch_size": [4, 12],
            "measure": {"warmup_steps": 2, "steps": 1},
            "tuners": [{"tuner": name}],
        }
    )
    for spec in expand(suite, "cpu"):
        real = execute(spec)
        assert real.status == "ok", real.error
        predicted = estimate_memory(spec)
        assert predicted.memory_source == "estimate"
        for field in FIELDS:
            assert getattr(predicted, field) == getattr(real.metrics, field), (name, spec.batch_size, field)
