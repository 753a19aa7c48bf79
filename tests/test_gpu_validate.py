"""The GPU validation kit: end to end in its CPU mode on a tiny model (estimate = measurement to the byte), and
the comparison table it writes, on synthetic rows."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from petlbench.columns import Metrics
from petlbench.estimate.client import Estimate, estimate_result
from petlbench.results import RunResult, now_iso, write_result
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite as parse_suite_file
from petlbench.spec.loading import parse_suite
from tests.conftest import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    """A validation tool under scripts/, imported as a module (they are run as `python scripts/NAME.py`)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


calibration = _script("calibration")
KIT_SUITE = """\
name: kit
device: cpu
backbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 3}}
data: {name: synthetic, num_classes: 10}
batch_size: 4
precision: [fp32, bf16-mixed]
measure: {warmup_steps: 2, steps: 1}
timeout_s: 120
tuners: [{tuner: linear}, {tuner: lora, params: {rank: 4}}]
"""


@pytest.mark.slow
def test_the_kit_runs_end_to_end_on_cpu_with_tiny(tmp_path: Path) -> None:
    """`scripts/gpu-validate.sh --device cpu --tiny`: the whole chain on CPU, every estimate exact to the byte."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    kit = str(ROOT / "scripts" / "gpu-validate.sh")
    # the shipped tiny suite with three of its tuners: the chain is what is under test here; every tuner's estimate
    # equals its CPU measurement in tests/test_estimate.py
    raw = yaml.safe_load((ROOT / "suites" / "memory-reduced-tiny.yaml").read_text())
    raw["tuners"] = [t for t in raw["tuners"] if t["tuner"] in ("full", "lora", "dtl")]
    suite = tmp_path / "memory-reduced-tiny.yaml"
    suite.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        ["bash", kit, "--device", "cpu", "--tiny", "--suite", str(suite), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = len(expand(parse_suite_file(suite), "cpu"))
    assert runs == 2 * 3
    assert f"exact: all {runs} estimates equal the measured bytes" in done.stdout
    assert "GPU tests not run (device cpu" in done.stdout
    with (out / "estimate-vs-measured.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == runs and {r["precision"] for r in rows} == {"fp32", "bf16-mixed"}
    assert all(float(r["allocated_abs_error_bytes"]) == 0 and float(r["infer_abs_error_bytes"]) == 0 for r in rows)
    assert f"| allocated | {runs} | +0.00% | 0.00% |" in (out / "estimate-vs-measured.md").read_text()
    reference = (out / "train-step-reference.md").read_text()
    assert "bare loop, 20 steps" in reference and "petlbench row" in reference
    timings = (out / "timings.txt").read_text()
    assert "measure: petlbench run" in timings and "total " in timings
    for name in ("environment.txt", "run.log", "estimate.log", "compare.log"):
        assert (out / name).stat().st_size > 0, name


def test_the_kit_rejects_bad_arguments() -> None:
    kit = str(ROOT / "scripts" / "gpu-validate.sh")
    bad = subprocess.run(["bash", kit, "--device", "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--device: expected cuda or cpu" in bad.stderr
    missing = subprocess.run(["bash", kit, "--suite", "nope.yaml"], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.yaml: no such file" in missing.stderr


def _rows(tmp_path: Path, measured_peak: int, estimated_peak: int, reserved: int | None) -> None:
    suite = parse_suite(
        {
            "name": "cal",
            "device": "cuda",
            "data": {"name": "synthetic"},
            "backbone": TINY_BACKBONE.model_dump(),
            "tuners": [{"tuner": "linear"}],
        }
    )
    spec = expand(suite, "cuda")[0]
    measured = Metrics(
        memory_source="cuda_allocator",
        peak_allocated_bytes=measured_peak,
        peak_reserved_bytes=reserved,
        peak_driver_bytes=None if reserved is None else reserved + 500_000_000,
        mem_tracked_peak_bytes=measured_peak - 1000,
        peak_infer_bytes=100,
    )
    write_result(tmp_path, RunResult(spec=spec, status="ok", metrics=measured, created_at=now_iso()))
    predicted = Metrics(memory_source="estimate", peak_allocated_bytes=estimated_peak, peak_infer_bytes=100)
    write_result(tmp_path, estimate_result(spec, Estimate(run_id=spec.run_id, metrics=predicted)))


def test_the_table_reports_absolute_and_relative_errors_per_view(tmp_path: Path) -> None:
    _rows(tmp_path, measured_peak=1_000_000, estimated_peak=950_000, reserved=1_200_000)
    assert calibration.main([str(tmp_path), "cal", str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "estimate-vs-measured.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["allocated_abs_error_bytes"]) == -50_000
    assert float(row["allocated_rel_error"]) == pytest.approx(-0.05)
    assert float(row["reserved_rel_error"]) == pytest.approx(950_000 / 1_200_000 - 1)
    assert float(row["nvml_bytes"]) == 501_200_000
    assert float(row["tracked_bytes"]) == 999_000
    assert "| allocated | 1 | -5.00% | 5.00% |" in (tmp_path / "out" / "estimate-vs-measured.md").read_text()
    # --exact (the CPU mode) fails on any byte of difference
    assert calibration.main([str(tmp_path), "cal", str(tmp_path / "out"), "--exact"]) == 1


def test_exact_mode_passes_only_on_equal_bytes(tmp_path: Path) -> None:
    _rows(tmp_path, measured_peak=1_000_000, estimated_peak=1_000_000, reserved=None)
    assert calibration.main([str(tmp_path), "cal", str(tmp_path / "out"), "--exact"]) == 0
    assert calibration.main([str(tmp_path), "other", str(tmp_path / "out")]) == 2  # no such results folder
