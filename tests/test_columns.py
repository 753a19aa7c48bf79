"""The catalogue of result columns (petlbench/columns.py) is the one list: a row never carries a column it does not
declare, every declared column is written somewhere, and the readers take names, formats and limits from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from petlbench.budget import LIMITS
from petlbench.columns import FAMILIES, Metrics, catalogue, column, declared, gated, limit_name
from petlbench.estimate.client import estimate_result, run_estimates, skipped_result
from petlbench.estimate.gpus import PRESETS, target_for
from petlbench.executors.process import RUNS_IN_FLIGHT_ENV
from petlbench.results import RunResult, failed_result, now_iso
from petlbench.run.worker import execute
from tests.test_worker import spec

ROOT = Path(__file__).resolve().parents[1]
SOURCES = "\n".join(p.read_text() for p in (ROOT / "petlbench").rglob("*.py"))


def _rows(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The rows this machine can write: a trained CPU run (as the executor starts it), a failed run, CPU and CUDA
    estimates from an estimator process (the CUDA one judged on a card, with its fit search), and a run
    --skip-predicted-oom did not start."""
    monkeypatch.setenv(RUNS_IN_FLIGHT_ENV, "1")
    trained = execute(spec(data={"name": "digits"}, train={"epochs": 1, "eval_batch_size": 64}))
    assert trained.status == "ok", trained.error
    cpu_spec, cuda_spec = spec(), spec().model_copy(update={"device": "cuda"})
    card = target_for(PRESETS["h100-80gb"], None)
    (cpu,) = run_estimates([cpu_spec]).values()  # the estimator process: its environment (the CPU's rates) too
    (cuda,) = run_estimates([cuda_spec], targets=[card], fit_search=True).values()
    results: list[RunResult] = [
        trained,
        failed_result(cpu_spec, "error", "boom").model_copy(update={"error_type": "RuntimeError"}),
        estimate_result(cpu_spec, cpu),
        estimate_result(cuda_spec, cuda),
        skipped_result(cpu_spec, cpu, 1),
    ]
    return [r.to_row() for r in results]


def test_a_row_never_carries_an_undeclared_column() -> None:
    row = spec()
    result = RunResult(spec=row, status="ok", created_at=now_iso(), env={"not_in_the_catalogue": 1})
    with pytest.raises(TypeError, match=r"not in the catalogue \(petlbench/columns\.py\): env\.not_in_the_catalogue"):
        result.to_row()
    with pytest.raises(KeyError, match=r"declare it in petlbench/columns\.py"):
        column("peak_alocated_bytes")


@pytest.mark.slow
def test_every_declared_column_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    written: set[str] = set()
    for row in _rows(monkeypatch):
        undeclared = [name for name in row if not declared(name)]
        assert not undeclared, undeclared
        # a spec field is written as a key (None is its value when unset); a measurement when it has a value
        spec_fields = {name for name in row if name.startswith(FAMILIES) or catalogue()[name].col.role == "control"}
        written |= {name for name, value in row.items() if value is not None or name in spec_fields}
    # what this machine writes: every column but those only a GPU run, a file-based dataset or a checkpoint fills
    elsewhere = {"cuda", "files"}
    missing = sorted(name for name, col in catalogue().items() if col.col.when not in elsewhere and name not in written)
    assert not missing, f"declared in petlbench/columns.py but never written: {missing}"
    # the others are at least assigned somewhere in the code (a spec field is written from the spec itself)
    for name, col in catalogue().items():
        if col.col.when in elsewhere and name not in written and col.col.role != "control":
            key = name.removeprefix("env.")
            assert re.search(rf"\b{re.escape(key)}\b\s*(=|:)|[\"']{re.escape(key)}[\"']", SOURCES), name


def test_budgets_and_readers_take_their_limits_and_formats_from_the_catalogue() -> None:
    assert set(LIMITS) == {limit_name(c) for c in gated()}
    assert LIMITS["max_peak_allocated_bytes"] == ("peak_allocated_bytes", "<=")
    assert LIMITS["min_acc_top1"] == ("acc_top1", ">=")
    assert column("peak_allocated_bytes").format(1536 * 1024**2) == "1.5 GiB"
    assert column("acc_top1").format(0.931) == "93.1%"
    assert column("train_images_per_s").format(1234.4) == "1,234 img/s"
    assert "tuner.rank" not in catalogue() and declared("tuner.rank") and FAMILIES == ("tuner.",)
    for name, info in Metrics.model_fields.items():  # every metric has a phase, a role and a unit
        assert name in catalogue(), name
        assert info.metadata, name
