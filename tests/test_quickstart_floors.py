"""The quickstart's accuracy floors (suites/budgets-quickstart.yaml): they cover every quickstart run, and
`petlbench check` applies them. Real results are checked with

    petlbench run && petlbench check --budgets suites/budgets-quickstart.yaml results/quickstart

(training the quickstart takes minutes, so no unit test does it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from petlbench.budget import check_files
from petlbench.columns import Metrics
from petlbench.results import RunResult
from petlbench.run.sweep import builtin_quickstart
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.tuners import TUNERS
from tests.report_rows import write

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ROOT / "suites" / "budgets-quickstart.yaml"


def floors() -> list[dict[str, Any]]:
    budgets: list[dict[str, Any]] = yaml.safe_load(FLOORS.read_text())["budgets"]
    return budgets


def selects(select: dict[str, Any], row: dict[str, Any]) -> bool:
    return all(row.get(key) in (value if isinstance(value, list) else [value]) for key, value in select.items())


def test_quickstart_has_every_tuner_at_batch_32_and_64() -> None:
    runs = expand(load_suite(builtin_quickstart()), "cpu")
    # the quickstart needs no extra install; compose only combines the tuners it runs
    built_in = {name for name, cls in TUNERS.items() if cls.extra is None and name != "compose"}
    for tuner in sorted(built_in - {r.tuner for r in runs}):
        raise AssertionError(
            f"the quickstart lacks tuner {tuner!r}: add `- tuner: {tuner}` with the `optimizer: {{lr: ...}}` that "
            "clears its 40% floor to petlbench/suites/quickstart.yaml (docs/development.md, 'Adding a tuner')"
        )
    assert {r.tuner for r in runs} <= built_in
    for tuner in built_in:
        assert {r.batch_size for r in runs if r.tuner == tuner} == {32, 64}, tuner
    assert sorted({r.knob for r in runs if r.tuner == "lora"}) == [4.0, 8.0]
    assert all(r.data.name == "digits" and r.backbone.img_size == 32 and r.backbone.weights == "random" for r in runs)
    assert all((r.train is not None) == (r.batch_size == 32) for r in runs)  # measured at 32 and 64, trained at 32


def test_every_quickstart_run_has_a_floor() -> None:
    trained = [r for r in expand(load_suite(builtin_quickstart()), "cpu") if r.train is not None]
    rows = [{"suite": "quickstart", "tuner": r.tuner, "batch_size": r.batch_size} for r in trained]
    for row in rows:
        assert any(selects(f["select"], row) for f in floors()), row
    full = [f for f in floors() if selects(f["select"], {"suite": "quickstart", "tuner": "full", "batch_size": 32})]
    assert max(f["min_acc_top1"] for f in full) == 0.90


def quickstart_rows(acc: dict[str, float]) -> list[dict[str, Any]]:
    """One result row per quickstart run, as `RunResult.to_row` writes them, with a given accuracy per tuner."""
    rows = []
    for spec in expand(load_suite(builtin_quickstart()), "cpu"):
        trained = acc[spec.tuner] if spec.train is not None else None  # the runs at batch 64 are measured only
        metrics = Metrics(acc_top1=trained, params_trainable=1, peak_allocated_bytes=1)
        result = RunResult(spec=spec, status="ok", metrics=metrics, created_at="2026-01-01T00:00:00+00:00")
        rows.append(result.to_row())
    return rows


def test_check_passes_quickstart_results_above_the_floors_and_fails_one_below(tmp_path: Path) -> None:
    good = dict.fromkeys(TUNERS, 0.45) | {"full": 0.91}
    write(quickstart_rows(good), tmp_path / "good")
    outcome = check_files([tmp_path / "good"], FLOORS)
    assert outcome.checks and not outcome.failed
    assert outcome.uncovered and all(" bs=64" in label for label in outcome.uncovered)  # measured, not trained

    write(quickstart_rows(good | {"full": 0.89, "sqt": 0.39}), tmp_path / "bad")
    failed = check_files([tmp_path / "bad"], FLOORS).failed
    assert {c.row.split()[0] for c in failed} == {"full", "sqt"}
    assert all(c.metric == "acc_top1" and c.op == ">=" for c in failed)


def test_the_quickstart_runs_one_run_per_core() -> None:
    from petlbench.executors.devices import available_cores
    from petlbench.run.sweep import quickstart_jobs

    runs = expand(load_suite(builtin_quickstart()), "cpu")
    assert all(r.measure.cpu_threads == 1 for r in runs)  # one thread each, so two runs never share a core
    assert quickstart_jobs(runs) == max(1, min(2, available_cores()))
    wide = [r.model_copy(update={"measure": r.measure.model_copy(update={"cpu_threads": 64})}) for r in runs]
    assert quickstart_jobs(wide) == 1
