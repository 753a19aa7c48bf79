"""The torch-free side of estimating: memory sizes, limits, devices, skipping, row placement, process chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

import petlbench.estimate.client as prediction
from petlbench.columns import Metrics
from petlbench.errors import ConfigError
from petlbench.estimate.client import (
    Estimate,
    estimate_device,
    estimate_result,
    groups_of,
    memory_limit,
    processes_for,
    split_predicted_oom,
)
from petlbench.fmt import parse_bytes
from petlbench.results import RunResult, load_results, now_iso, write_result
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from tests.conftest import TINY_BACKBONE


def runs(**overrides: object) -> list[RunSpec]:
    raw = {
        "name": "p",
        "device": "cpu",
        "data": {"name": "synthetic", "num_classes": 10},
        "backbone": TINY_BACKBONE.model_dump(),
        "batch_size": [4, 8],
        "tuners": [{"tuner": "linear"}, {"tuner": "lora", "grid": {"rank": [4, 8]}}],
        **overrides,
    }
    return expand(parse_suite(raw), "cpu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("80GiB", 80 * 2**30), ("2 GB", 2 * 10**9), ("512M", 512 * 2**20), ("1.5KiB", 1536), ("1000B", 1000)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "80 GiBs", "-1GiB", "0", "", "80", "24"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_memory_limit_defaults_to_the_gpu_and_is_required_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prediction, "gpu_memory_bytes", lambda gpu: 80 * 2**30 if gpu == "0" else None)
    assert memory_limit("2GiB", "cpu", [], "--memory-limit", required=True) == 2 * 2**30
    assert memory_limit(None, "cuda", ["0"], "--memory-limit", required=True) == 80 * 2**30
    assert memory_limit(None, "cpu", ["0"], "--device-memory", required=False) is None
    with pytest.raises(ConfigError, match=r"^--memory-limit: required for CPU runs"):
        memory_limit(None, "cpu", [], "--memory-limit", required=True)
    with pytest.raises(ConfigError, match=r"^--memory-limit: required for CUDA runs without a visible GPU"):
        memory_limit(None, "cuda", [], "--memory-limit", required=True)
    with pytest.raises(ConfigError, match=r"^--memory-limit: could not read GPU 1's memory"):
        memory_limit(None, "cuda", ["1"], "--memory-limit", required=True)
    with pytest.raises(ConfigError, match=r"^--device-memory: not a memory size"):
        memory_limit("big", "cuda", [], "--device-memory", required=False)


def test_estimate_device_predicts_cuda_without_a_gpu() -> None:
    assert estimate_device("auto") == "cuda" and estimate_device("cuda") == "cuda" and estimate_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device: expected auto, cpu or cuda"):
        estimate_device("tpu")


def _estimate(spec: RunSpec, peak: int | None, error: str | None = None) -> Estimate:
    metrics = None if peak is None else Metrics(memory_source="estimate", peak_allocated_bytes=peak)
    return Estimate(run_id=spec.run_id, metrics=metrics, error=error)


def test_only_runs_predicted_over_the_limit_are_skipped() -> None:
    over, fits, failed, missing = runs()[:4]
    estimates = {
        over.run_id: _estimate(over, 2000),
        fits.run_id: _estimate(fits, 1000),
        failed.run_id: _estimate(failed, None, "boom"),
    }
    keep, skipped = split_predicted_oom([over, fits, failed, missing], estimates, limit=1500)
    assert keep == [fits, failed, missing]  # an estimate that failed or is missing never skips a run
    (row,) = skipped
    assert row.spec == over and row.status == "skipped"
    assert row.metrics.peak_allocated_bytes == 2000 and row.metrics.memory_source == "estimate"
    assert row.metrics.memory_limit_bytes == 1500 and "predicted peak" in (row.error or "")


def test_estimate_rows_live_beside_measured_rows_and_reading_a_folder_skips_them(tmp_path: Path) -> None:
    spec = runs()[0]
    measured = Metrics(memory_source="cpu_tracker", peak_allocated_bytes=999)
    write_result(tmp_path, RunResult(spec=spec, status="ok", metrics=measured, created_at=now_iso()))
    row = estimate_result(spec, _estimate(spec, 1000))
    path = write_result(tmp_path, row)
    assert path.parent.name == "p.estimate" and path.name == f"{spec.run_id}.parquet"
    everything = load_results([tmp_path])
    assert list(everything["memory_source"]) == ["cpu_tracker"]  # results/ → measured rows only
    estimates = load_results([tmp_path / "p.estimate"])
    assert list(estimates["memory_source"]) == ["estimate"] and list(estimates["suite"]) == ["p.estimate"]
    assert list(estimates["run_id"]) == list(everything["run_id"])  # joinable on run_id


def test_groups_keep_a_configuration_together_and_processes_are_few() -> None:
    specs = runs(precision=["fp32", "bf16-mixed"], tuners=[{"tuner": "lora", "grid": {"rank": [1, 2, 3, 4, 5, 6]}}])
    groups = groups_of(specs)
    assert len(groups) == 6 and all(len(g) == 4 for g in groups)  # 2 batch sizes × 2 precisions per rank
    assert all(len({s.knob for s in g}) == 1 for g in groups)
    assert [g[0].knob for g in groups] == [1, 2, 3, 4, 5, 6]  # suite order
    assert processes_for(6, jobs=2) == 2 and processes_for(2, jobs=2) == 1 and processes_for(18, jobs=1) == 1


def test_a_dead_estimator_process_becomes_error_estimates() -> None:
    specs = runs()
    results = prediction.run_estimates(specs, python="/bin/false")
    assert set(results) == {s.run_id for s in specs}
    assert all(e.metrics is None and "exited with code 1" in (e.error or "") for e in results.values())
