"""The guard on CPU plans: a device: auto suite that falls back to the CPU is predicted first, and refused when it
would not fit the machine or take hours; --device cpu insists."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.errors import ConfigError
from petlbench.estimate import guard
from petlbench.estimate.guard import PlanCost, check_cpu_plan, images_per_run
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite

ROOT = Path(__file__).resolve().parents[1]


def test_the_headline_sweep_stops_at_once_on_a_cpu_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever this machine has
    result = CliRunner().invoke(app, ["run", str(ROOT / "suites" / "memory.yaml"), "--results-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "petlbench estimate" in errors[0] and "--device cpu" in errors[0]
    assert "more than this machine's" in errors[0]  # full fine-tuning at batch 256 needs ~30 GiB
    assert not list(tmp_path.rglob("*.parquet"))  # nothing ran


def _runs(**overrides: object) -> list:  # type: ignore[type-arg]
    raw = {
        "name": "g",
        "data": {"name": "synthetic", "num_classes": 10, "train_size": 100},
        "backbone": {"model": "test_vit", "img_size": 32},
        "batch_size": 8,
        "measure": {"warmup_steps": 2, "steps": 3},
        "tuners": [{"tuner": "linear"}],
        **overrides,
    }
    return expand(parse_suite(raw), "cpu")


def test_images_per_run_counts_every_step_a_run_takes() -> None:
    (run,) = _runs()
    assert images_per_run(run) == pytest.approx(8 * (2 + 3 + 1) + 8 * 4 / 3)  # steps + tracked step + inference
    (trained,) = _runs(train={"epochs": 2, "eval_every": 1})
    assert images_per_run(trained) > images_per_run(run) + 2 * 100  # two epochs of 100 images, and evaluations


def test_a_long_or_oversized_plan_is_refused_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _runs()
    monkeypatch.setattr(guard, "plan_cost", lambda runs, jobs=1: PlanCost(7200.0, 10, 100, []))
    with pytest.raises(ConfigError, match=r"predicted to take ~2.0 h .*petlbench estimate s.yaml.*--device cpu"):
        check_cpu_plan("s.yaml", runs)
    monkeypatch.setattr(guard, "plan_cost", lambda runs, jobs=1: PlanCost(60.0, 200, 100, ["full bs=8 fp32"]))
    with pytest.raises(ConfigError, match=r"heaviest run \(full bs=8 fp32\) is predicted to need 200 B"):
        check_cpu_plan("s.yaml", runs)
    monkeypatch.setattr(guard, "plan_cost", lambda runs, jobs=1: PlanCost(60.0, 10, 100, []))
    assert check_cpu_plan("s.yaml", runs).seconds == 60.0
