"""Estimating many runs in one process: reused fake models, batch sizes replayed from two traces, the CUDA deltas,
and the `python -m petlbench.estimate.engine` subprocess the CLI uses."""

from __future__ import annotations

from typing import Any

import pytest

from petlbench.columns import Metrics
from petlbench.estimate.client import SearchRequest, estimate_caveats, run_estimates
from petlbench.estimate.engine import Estimator, estimate_many, estimate_memory
from petlbench.measure.timeline import at_batch
from petlbench.measure.tracker import ALLOC, FREE, Timeline, replay
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from petlbench.tuners import TUNERS
from tests.conftest import TINY_BACKBONE


def suite(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "many",
        "device": "cpu",
        "data": {"name": "synthetic", "num_classes": 10},
        "backbone": TINY_BACKBONE.model_dump(),
        "batch_size": [4, 12],
        "measure": {"warmup_steps": 2, "steps": 1},
        "tuners": [{"tuner": name} for name in sorted(TUNERS)],
        **overrides,
    }


NO_DROPOUT = [
    {"tuner": n, "params": {k: 0.0 for k in TUNERS[n].model_fields if k.endswith("dropout")}} for n in sorted(TUNERS)
]


def specs(device: str = "cpu", **overrides: Any) -> list[RunSpec]:
    return expand(parse_suite(suite(**overrides)), "cuda" if device == "cuda" else "cpu")


# what a tuner changes in the op sequence is covered by the fp32 pass over every tuner; under mixed precision the
# casts and (on CUDA) the rounding are what is new, so one tuner of each kind of graph is enough there
MIXED_PRECISION_TUNERS = ["full", "linear", "lora", "vpt", "lst", "dtl"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("device", "precision", "tuners"),
    [
        ("cpu", "fp32", sorted(TUNERS)),
        ("cpu", "bf16-mixed", MIXED_PRECISION_TUNERS),
        ("cuda", "bf16-mixed", MIXED_PRECISION_TUNERS),
    ],
)
def test_reused_and_replayed_estimates_equal_fresh_traces(device: str, precision: str, tuners: list[str]) -> None:
    # batch sizes 4 and 12 are traced; 3 and 40 are replayed (inside and outside the traced range); 1 is traced
    # (size-1 dimensions change the op sequence: full fine-tuning allocates 4 KiB less than the line says).
    # CUDA specs differ from CPU ones by the 512-B rounding (applied at replay) and the dropout mapping (traced).
    assert set(tuners) <= set(TUNERS)
    runs = specs(device, batch_size=[4, 12, 1, 3, 40], precision=precision, tuners=[{"tuner": t} for t in tuners])
    many = dict(estimate_many(runs))
    assert len(many) == len(runs)
    for i, run in enumerate(runs):
        fresh = estimate_memory(run)  # its own model, traced at exactly this batch size
        assert many[i].error is None, many[i].error
        assert many[i].metrics == fresh, (run.label(), many[i].metrics, fresh)


@pytest.mark.slow
def test_bf16_and_batch_1_estimates_equal_the_real_cpu_run() -> None:
    bf16 = specs(batch_size=[4, 12], precision="bf16-mixed", tuners=[{"tuner": "lora"}, {"tuner": "vpt"}])
    for run in [*bf16, *specs(batch_size=[1, 2], tuners=[{"tuner": "full"}])]:
        real = execute(run)
        assert real.status == "ok", real.error
        predicted = estimate_memory(run)
        assert predicted.peak_allocated_bytes == real.metrics.peak_allocated_bytes, run.label()
        assert predicted.peak_infer_bytes == real.metrics.peak_infer_bytes, run.label()


@pytest.mark.slow
def test_cuda_estimates_apply_the_documented_deltas() -> None:
    pairs = zip(
        specs("cpu", tuners=NO_DROPOUT, batch_size=4), specs("cuda", tuners=NO_DROPOUT, batch_size=4), strict=True
    )
    for cpu_run, cuda_run in pairs:
        cpu, cuda = estimate_memory(cpu_run), estimate_memory(cuda_run)
        assert cpu.estimate_note is None and cpu.estimate_approximate is False
        assert cuda.estimate_note is not None and "caching-allocator model" in cuda.estimate_note
        # fp32 on an H100 runs memory-efficient attention: where its backward runs, its scratch is an approximate
        # size, and the row says so; nothing else here is approximate (no dropout, single-tensor AdamW)
        approximate = cuda.estimate_note.partition("approximate: ")[2]
        assert approximate in ("", "attention-backward scratch of memory-efficient/cuDNN kernels")
        assert cuda.estimate_approximate is bool(approximate)
        assert cuda_run.tuner != "linear" or not approximate  # a linear probe runs no attention backward
        # the tracked step, every storage rounded up to 512 B: more bytes, never more than 511 per storage
        assert cpu.mem_tracked_peak_bytes is not None and cuda.mem_tracked_peak_bytes is not None
        assert cpu.mem_tracked_peak_bytes < cuda.mem_tracked_peak_bytes < cpu.mem_tracked_peak_bytes + 511 * 2000
        # the allocator's view (tests/test_allocator.py): whole blocks, two cuBLAS workspaces, reserved segments
        assert cuda.peak_allocated_bytes is not None and cuda.peak_allocated_bytes % 512 == 0
        assert cuda.workspace_bytes == 2 * 32 * 2**20
        assert (cuda.peak_reserved_bytes or 0) >= cuda.peak_allocated_bytes
    # dropout: CUDA's fused kernel keeps a 1-byte mask where CPU keeps a 4-byte float one
    lora = {"tuners": [{"tuner": "lora", "params": {"dropout": 0.5}}], "batch_size": 64}
    cpu, cuda = estimate_memory(specs("cpu", **lora)[0]), estimate_memory(specs("cuda", **lora)[0])
    assert cuda.estimate_note is not None and "1-B dropout masks" in cuda.estimate_note
    assert (cuda.mem_activations_bytes or 0) < (cpu.mem_activations_bytes or 0)
    assert "dropout" not in cuda.estimate_note.partition("approximate:")[2]  # it maps exactly onto CUDA's kernel
    # attention dropout runs in CUDA's fused kernel: SQT's query attention runs SDPA with dropout_p
    sqt = estimate_memory(specs("cuda", tuners=[{"tuner": "sqt", "params": {"dropout": 0.1}}])[0])
    assert "attention dropout" not in (sqt.estimate_note or "")
    assert (sqt.attn_kernel or "").endswith("(predicted, sm90)")
    bf16 = estimate_memory(specs("cuda", precision="bf16-mixed", tuners=[{"tuner": "linear"}])[0])
    assert bf16.estimate_approximate is False and "CUDA autocast lists" in (bf16.estimate_note or "")


def test_caveats_name_what_is_approximate() -> None:
    run = specs("cuda", optimizer={"foreach": True}, precision="fp16-mixed", tuners=[{"tuner": "full"}])[0]
    note, approximate = estimate_caveats(run)
    assert approximate and note is not None
    assert "approximate: foreach" in note and "GradScaler" in note and "autocast" in note


def test_fp16_cuda_estimate_is_below_fp32() -> None:
    fp16 = estimate_memory(specs("cuda", precision="fp16-mixed", tuners=[{"tuner": "lora"}])[0])
    fp32 = estimate_memory(specs("cuda", tuners=[{"tuner": "lora"}])[0])
    assert fp16.peak_allocated_bytes is not None and fp32.peak_allocated_bytes is not None
    assert fp16.peak_allocated_bytes < fp32.peak_allocated_bytes


def test_at_batch_refuses_what_is_not_affine() -> None:
    def timeline(batch: int, shape: tuple[int, ...], nbytes: int) -> Timeline:
        return Timeline(((ALLOC, 0, "activations", nbytes), (FREE, 0, "activations", nbytes)), (shape,), frozenset())

    linear_a, linear_b = timeline(2, (2, 5), 40), timeline(6, (6, 5), 120)
    predicted = at_batch(linear_a, 2, linear_b, 6, 10)
    assert predicted is not None and replay(predicted).peak_bytes == 200
    # B in two dimensions (B×B) is quadratic even when two points look affine
    assert at_batch(timeline(2, (2, 2), 16), 2, timeline(6, (6, 6), 144), 6, 10) is None
    # a different sequence of events
    other = Timeline(((ALLOC, 0, "gradients", 120),), ((6, 5),), frozenset())
    assert at_batch(linear_a, 2, other, 6, 10) is None


def test_the_estimator_search_finds_the_largest_batch_under_a_limit() -> None:
    run = specs(batch_size=1, tuners=[{"tuner": "lora"}])[0]
    at_40 = estimate_memory(run.model_copy(update={"batch_size": 40})).peak_allocated_bytes or 0
    result = Estimator().search(run, SearchRequest(limit_bytes=at_40, min=1, max=4096))
    assert result.max_batch == 40 and result.first_over == 41
    assert result.metrics is not None and result.metrics.peak_allocated_bytes == at_40
    assert result.metrics.peak_infer_bytes is not None  # the answer is a full estimate


@pytest.mark.slow
def test_subprocess_estimates_match_in_process_and_failures_become_errors() -> None:
    runs = specs(batch_size=4)  # five configurations: two estimator processes
    broken = runs[0].model_copy(update={"precision": "fp16-mixed"})  # fp16 needs CUDA, on CPU as in the worker
    progress: list[tuple[int, int]] = []
    results = run_estimates([*runs, broken], jobs=2, on_progress=lambda d, t, _: progress.append((d, t)))
    assert sorted(progress)[-1] == (len(runs) + 1, len(runs) + 1)
    for run in runs:
        metrics = results[run.run_id].metrics
        assert isinstance(metrics, Metrics) and metrics == estimate_memory(run)
        assert results[run.run_id].env.get("torch")
    assert results[broken.run_id].metrics is None
    assert "fp16-mixed needs device cuda" in (results[broken.run_id].error or "")
