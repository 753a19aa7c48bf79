"""Issue acceptance: a tuner that allocates more than budgeted fails `check` (exit 1, naming the row);
restoring it passes again. Real rows: the smoke suite's LoRA run, measured in-process on CPU (exact bytes)."""

from __future__ import annotations

import math
from pathlib import Path

from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.results import RunResult, write_result
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import RunSpec

REPO = Path(__file__).resolve().parents[1]


def measure(spec: RunSpec, results: Path) -> RunResult:
    result = execute(spec)
    assert result.status == "ok", result.error
    write_result(results, result)
    return result


def with_rank(spec: RunSpec, rank: int) -> RunSpec:
    data = spec.model_dump()
    data["tuner_params"] = {**spec.tuner_params, "rank": rank}
    data["knob"] = float(rank)
    return RunSpec.model_validate(data)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_lora_over_budget_fails_check_and_restoring_it_passes(tmp_path: Path) -> None:
    runs = expand(load_suite(REPO / "suites" / "smoke.yaml"), "cpu")
    lora = next(r for r in runs if r.tuner == "lora" and r.batch_size == 8 and r.knob == 8)
    runner = CliRunner()

    baseline = measure(lora, tmp_path / "baseline")
    peak = baseline.metrics.peak_allocated_bytes
    params = baseline.metrics.params_trainable
    assert peak is not None and params is not None
    budgets = tmp_path / "budgets.yaml"
    # The selector names no knob: whatever rank the suite uses, the LoRA row at batch 8 must fit.
    budgets.write_text(
        "budgets:\n"
        "  - select: {suite: smoke, tuner: lora, batch_size: 8, device: cpu, memory_source: cpu_tracker}\n"
        f"    max_peak_allocated_bytes: {math.ceil(peak * 1.05)}\n"
        f"    max_params_trainable: {params}\n"
    )
    passed = runner.invoke(app, ["check", "--budgets", str(budgets), str(tmp_path / "baseline")])
    assert passed.exit_code == 0, passed.output

    bigger = measure(with_rank(lora, 64), tmp_path / "changed")
    assert bigger.metrics.peak_allocated_bytes is not None and bigger.metrics.peak_allocated_bytes > peak * 1.05
    failed = runner.invoke(app, ["check", "--budgets", str(budgets), str(tmp_path / "changed")])
    assert failed.exit_code == 1, failed.output
    text = flat(failed.output)
    assert "FAIL lora rank=64 bs=8 peak" in text
    assert "FAIL lora rank=64 bs=8 params" in text
    assert "error: 2 check(s) failed: lora rank=64 bs=8 (smoke fp32 cpu) peak_allocated_bytes" in text
    assert bigger.run_id in text

    restored = measure(lora, tmp_path / "restored")
    assert restored.metrics.peak_allocated_bytes == peak  # CPU accounting is exact: same bytes on a re-run
    again = runner.invoke(app, ["check", "--budgets", str(budgets), str(tmp_path / "restored")])
    assert again.exit_code == 0, again.output
    assert "2 within budget, 0 over" in flat(again.output)
