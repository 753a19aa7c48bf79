"""The quickstart's accuracy floors (suites/budgets-quickstart.yaml): always checked for coverage, and checked
against real quickstart results when given:

    petlbench run --results-dir /tmp/qs --force
    PETLBENCH_QUICKSTART_RESULTS=/tmp/qs pytest tests/test_quickstart_floors.py

(Training the quickstart takes minutes, so no unit test does it.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from petlbench.cli import builtin_quickstart
from petlbench.results import load_results
from petlbench.suite import expand, load_suite
from petlbench.tuners import TUNER_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ROOT / "suites" / "budgets-quickstart.yaml"
RESULTS_ENV = "PETLBENCH_QUICKSTART_RESULTS"


def floors() -> list[dict[str, Any]]:
    budgets: list[dict[str, Any]] = yaml.safe_load(FLOORS.read_text())["budgets"]
    return budgets


def selects(select: dict[str, Any], row: dict[str, Any]) -> bool:
    return all(row.get(key) in (value if isinstance(value, list) else [value]) for key, value in select.items())


def test_quickstart_has_every_tuner_at_batch_32_and_64() -> None:
    runs = expand(load_suite(builtin_quickstart()), "cpu")
    assert {r.tuner for r in runs} == set(TUNER_CONFIGS)
    for tuner in TUNER_CONFIGS:
        assert {r.batch_size for r in runs if r.tuner == tuner} == {32, 64}, tuner
    assert sorted({r.knob for r in runs if r.tuner == "lora"}) == [4.0, 8.0]
    assert all(r.data.name == "digits" and r.backbone.img_size == 32 and r.backbone.weights == "random" for r in runs)
    assert all(r.train is not None for r in runs)


def test_every_quickstart_run_has_a_floor() -> None:
    rows = [{"suite": "quickstart", "tuner": r.tuner} for r in expand(load_suite(builtin_quickstart()), "cpu")]
    for row in rows:
        assert any(selects(f["select"], row) for f in floors()), row
    full = [f for f in floors() if selects(f["select"], {"suite": "quickstart", "tuner": "full"})]
    assert [f["min_acc_top1"] for f in full] == [0.90]


@pytest.mark.skipif(RESULTS_ENV not in os.environ, reason=f"set {RESULTS_ENV}=<results dir of a quickstart run>")
def test_quickstart_results_meet_the_floors() -> None:
    frame = load_results([Path(os.environ[RESULTS_ENV])])
    rows = [r for r in frame.to_dict("records") if r["suite"] == "quickstart"]
    expected = {r.run_id for r in expand(load_suite(builtin_quickstart()), "cpu")}
    assert expected <= {r["run_id"] for r in rows}, "results lack runs of the current quickstart; rerun it"
    failures = []
    for floor in floors():
        selected = [r for r in rows if r["run_id"] in expected and selects(floor["select"], r)]
        assert selected, f"{floor['name']}: selects no row"
        for row in selected:
            acc = row["acc_top1"]
            label = f"{row['tuner']} knob={row['knob']} bs={row['batch_size']}"
            if row["status"] != "ok" or acc is None or acc < floor["min_acc_top1"]:
                failures.append(f"{label}: acc_top1 {acc} (status {row['status']}) < {floor['min_acc_top1']}")
    assert not failures, "\n".join(failures)
