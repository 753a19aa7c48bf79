"""The guard on CPU plans: a device: auto suite that falls back to the CPU is predicted first, and refused when it
would not fit the machine or take hours; --device cpu insists."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.errors import ConfigError
from petlbench.estimate import guard
from petlbench.estimate.client import model_key
from petlbench.estimate.guard import PlanCost, check_cpu_plan
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


MACHINE = guard.Machine(matmul_rate=4e10, op_seconds=2e-6, cores=2, load=0.0)
COST = guard.StepCost(flops_per_image=1e8, ops=2000)


def test_a_run_costs_every_step_of_its_protocol() -> None:
    (run,) = _runs()
    step = guard.step_seconds(COST, 8, MACHINE)
    assert step == pytest.approx(guard.OP_FACTOR * 2e-6 * 2000 + 1e8 * 8 / (guard.EFFICIENCY * 4e10))
    alone = guard.run_seconds(run, COST, MACHINE)
    assert alone > (2 + 3 + 1) * step  # warm-up, timed and tracked steps at least
    (trained,) = _runs(train={"epochs": 2, "eval_every": 1})
    (longer,) = _runs(train={"epochs": 4, "eval_every": 1})
    train, test = guard.dataset_sizes(trained)
    evaluation = math.ceil(test / 8) * guard.FORWARD_SHARE * step + test * guard.IMAGE_S
    epoch = math.ceil(train / 8) * step + train * guard.IMAGE_S + evaluation
    more = guard.run_seconds(longer, COST, MACHINE) - guard.run_seconds(trained, COST, MACHINE)
    assert more == pytest.approx(2 * epoch)  # two more epochs, each with its evaluation


def test_a_plan_spreads_its_runs_over_the_runs_at_once_and_slows_down_with_the_load() -> None:
    runs = _runs(batch_size=[8, 16], tuners=[{"tuner": "linear"}, {"tuner": "lora"}])
    costs = {model_key(r): COST for r in runs}
    one = guard.plan_seconds(runs, costs, MACHINE, parallel=1)
    two = guard.plan_seconds(runs, costs, MACHINE, parallel=2)
    busy = guard.plan_seconds(runs, costs, replace(MACHINE, load=4.0), parallel=2)
    assert one is not None and two is not None and busy is not None
    runs_alone = sum(guard.run_seconds(r, COST, MACHINE) for r in runs)
    assert one == pytest.approx(runs_alone + guard.SWEEP_S)
    assert two == pytest.approx(runs_alone / 2 + guard.SWEEP_S)
    assert busy == pytest.approx(two * (4.0 + 2) / 2)  # two cores, four other busy processes
    assert guard.plan_seconds(runs, {}, MACHINE, 1) is None


def test_a_long_or_oversized_plan_is_refused_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _runs()
    monkeypatch.setattr(guard, "plan_cost", lambda runs, parallel=1, jobs=1: PlanCost(7200.0, 10, 100, []))
    with pytest.raises(ConfigError, match=r"predicted to take ~2 h 00 min .*petlbench estimate s.yaml --device cpu"):
        check_cpu_plan("s.yaml", runs)
    monkeypatch.setattr(
        guard, "plan_cost", lambda runs, parallel=1, jobs=1: PlanCost(60.0, 200, 100, ["full bs=8 fp32"])
    )
    with pytest.raises(ConfigError, match=r"heaviest run \(full bs=8 fp32\) is predicted to need 200 B"):
        check_cpu_plan("s.yaml", runs)
    monkeypatch.setattr(guard, "plan_cost", lambda runs, parallel=1, jobs=1: PlanCost(60.0, 10, 100, []))
    assert check_cpu_plan("s.yaml", runs).seconds == 60.0
