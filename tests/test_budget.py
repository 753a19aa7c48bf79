"""Budgets: parsing (human units, one-line errors), the pure check, ratios, baselines, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from petlbench.budget import (
    Budgets,
    check,
    load_budgets,
    propose_baseline,
)
from petlbench.cli.app import app
from petlbench.errors import ConfigError
from petlbench.fmt import parse_bytes
from petlbench.report.rows import normalise
from tests.report_rows import MiB, frame, row, write

REPO = Path(__file__).resolve().parents[1]


def flat(text: str) -> str:
    return " ".join(text.split())


def cpu_rows() -> list[dict[str, object]]:
    return [
        row("full", 8, device="cpu", peak=40 * MiB, params=100_000, suite="smoke"),
        row("linear", 8, device="cpu", peak=10 * MiB, params=1_000, suite="smoke"),
        row("lora", 8, knob=8, device="cpu", peak=16 * MiB, params=5_000, suite="smoke"),
        row("full", 16, device="cpu", peak=70 * MiB, params=100_000, suite="smoke"),
        row("linear", 16, device="cpu", peak=20 * MiB, params=1_000, suite="smoke"),
    ]


def budgets(raw: dict[str, object]) -> Budgets:
    return Budgets.model_validate(raw)


# --- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5GiB", 1536 * MiB),
        ("900MiB", 900 * MiB),
        ("900 MiB", 900 * MiB),
        ("4kib", 4096),
        ("2GB", 2_000_000_000),
        ("1.5 KB", 1500),
        (123456, 123456),
        ("0.5B", 1),  # rounded up: a budget never shrinks below what was written
        ("12B", 12),
        ("512M", 512 * MiB),  # the same forms as --memory-limit
    ],
)
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text", ["1.5 gigs", "MiB", "-3MiB", "", True, [1], "1.2.3GiB", "0", 0, float("inf"), "123456", "80"]
)
def test_parse_bytes_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_budget_file_accepts_human_units(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("budgets:\n  - select: {tuner: lora, batch_size: [8, 16]}\n    max_peak_allocated_bytes: 1.5GiB\n")
    parsed = load_budgets(path)
    assert parsed.budgets[0].max_peak_allocated_bytes == 1536 * MiB
    assert parsed.budgets[0].select.batch_size == [8, 16]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "budgets:\n  - select: {tuner: lora}\n    max_peak_allocated_bytes: lots\n",
            "b.yaml: budgets[0].max_peak_allocated_bytes: not a memory size: 'lots'",
        ),
        (
            "budgets:\n  - select: {tuner: lora}\n    max_peak_allocated_bytes: 2XiB\n",
            "b.yaml: budgets[0].max_peak_allocated_bytes: not a memory size: '2XiB' (unknown unit 'xib')",
        ),
        (
            "budgets:\n  - select: {tuner: lora, rnak: 4}\n    max_params_trainable: 5\n",
            "b.yaml: budgets[0].select.rnak: unknown key",
        ),
        ("budgets:\n  - select: {tuner: lora}\n    max_peak: 5\n", "b.yaml: budgets[0].max_peak: unknown key"),
        ("budgets:\n  - select: {tuner: lora}\n", "b.yaml: budgets[0]: give at least one limit"),
        ("budgets:\n  - select: {precision: fp64}\n    max_params_trainable: 5\n", "budgets[0].select.precision"),
        (
            "ratios:\n  - select: {tuner: a}\n    versus: {tuner: b}\n",
            "b.yaml: ratios[0]: give max_ratio, min_ratio or both",
        ),
        (
            "ratios:\n  - select: {tuner: a}\n    versus: {tuner: b}\n    metric: acc\n    max_ratio: 1\n",
            "ratios[0].metric",
        ),
        ("{}\n", "b.yaml: <top level>: no budgets"),
        ("budgets: [\n", "b.yaml:2:1: YAML syntax error"),
    ],
)
def test_malformed_budget_files_name_the_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_budgets(path)
    assert message in str(info.value)


# --- the pure check ------------------------------------------------------------------------------------------


def test_check_passes_and_fails_each_selected_row() -> None:
    rows = normalise(frame(cpu_rows()))
    spec = budgets(
        {
            "budgets": [
                {"select": {"tuner": "linear"}, "max_peak_allocated_bytes": "15MiB", "max_params_trainable": 1000},
                {"name": "lora-8", "select": {"tuner": "lora", "knob": 8}, "max_peak_allocated_bytes": "15MiB"},
            ]
        }
    )
    results = check(rows, spec)
    summary = [(r.where, r.row, r.metric, r.passed) for r in results]
    assert summary == [
        ("budgets[0]", "linear bs=8", "peak_allocated_bytes", True),
        ("budgets[0]", "linear bs=8", "params_trainable", True),
        ("budgets[0]", "linear bs=16", "peak_allocated_bytes", False),  # 20 MiB > 15 MiB
        ("budgets[0]", "linear bs=16", "params_trainable", True),
        ("budgets[1]", "lora rank=8 bs=8", "peak_allocated_bytes", False),  # 16 MiB > 15 MiB
    ]
    failed = [r for r in results if not r.passed]
    assert failed[0].actual == 20 * MiB and failed[0].limit == 15 * MiB and failed[0].op == "<="
    assert failed[1].budget == "lora-8" and failed[1].setting == "smoke fp32 cpu"


def test_min_images_per_s_and_failed_runs() -> None:
    rows = normalise(
        frame(
            [
                row("lora", 32, knob=8, peak=MiB, ips=900.0),
                row("lora", 64, knob=8, status="oom", error="out of memory at batch size 64: CUDA out of memory"),
            ]
        )
    )
    results = check(rows, budgets({"budgets": [{"select": {"tuner": "lora"}, "min_train_images_per_s": 1000}]}))
    assert [(r.row, r.passed) for r in results] == [("lora rank=8 bs=32", False), ("lora rank=8 bs=64", False)]
    assert results[0].op == ">=" and results[0].actual == 900.0
    assert results[1].actual is None and results[1].note.startswith("run ended oom: out of memory at batch size 64")


def test_budget_matching_no_row_is_a_config_error() -> None:
    rows = normalise(frame(cpu_rows()))
    spec = budgets(
        {
            "budgets": [
                {"select": {"tuner": "linear"}, "max_params_trainable": 1000},
                {"select": {"tuner": "lroa"}, "max_params_trainable": 1},
                {"select": {"tuner": "lora", "batch_size": 16}, "max_params_trainable": 1},
            ]
        }
    )
    with pytest.raises(ConfigError) as info:
        check(rows, spec, source="b.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("b.yaml: budgets[1].select: selects no result row (tuner=lroa): no row has tuner=lroa")
    assert "results have: full, linear, lora" in lines[0]
    assert lines[1].startswith("b.yaml: budgets[2].select: selects no result row (tuner=lora batch_size=16)")
    assert "no row matches all fields together" in lines[1]


def test_ratio_budget_pairs_rows_at_the_same_settings() -> None:
    rows = normalise(frame(cpu_rows()))
    spec = {"ratios": [{"select": {"tuner": "linear"}, "versus": {"tuner": "full"}, "max_ratio": 0.3}]}
    results = check(rows, budgets(spec))
    # linear/full: 10/40 = 0.25 at bs 8 (pass), 20/70 = 0.286 at bs 16 (pass)
    assert [(r.row, round(r.actual or 0, 3), r.passed) for r in results] == [
        ("linear bs=8", 0.25, True),
        ("linear bs=16", 0.286, True),
    ]
    assert results[0].versus == "full" and results[0].metric == "peak_allocated_bytes ratio" and not results[0].note
    tighter = {"ratios": [{"select": {"tuner": "linear"}, "versus": {"tuner": "full"}, "max_ratio": 0.27}]}
    assert [r.passed for r in check(rows, budgets(tighter))] == [True, False]
    floor = {
        "ratios": [
            {"select": {"tuner": "full"}, "versus": {"tuner": "linear"}, "metric": "params_trainable", "min_ratio": 50}
        ]
    }
    assert [r.passed for r in check(rows, budgets(floor))] == [True, True]


def test_ratio_without_partner_fails_and_ambiguous_partner_is_a_config_error() -> None:
    rows = normalise(frame(cpu_rows()))
    # lora only ran at bs 8; at bs 16 there is no lora row... but the ratio selects full at both batch sizes
    spec = {"ratios": [{"select": {"tuner": "full"}, "versus": {"tuner": "lora"}, "max_ratio": 10}]}
    results = check(rows, budgets(spec))
    assert [(r.row, r.passed, r.versus, r.note) for r in results] == [
        ("full bs=8", True, "lora rank=8", ""),
        ("full bs=16", False, "tuner=lora", "no tuner=lora row at the same settings"),
    ]
    two = normalise(frame([*cpu_rows(), row("lora", 8, knob=4, device="cpu", peak=MiB, suite="smoke")]))
    with pytest.raises(
        ConfigError, match=r"ratios\[0\]\.versus: 2 rows \(lora rank=4, lora rank=8\) pair with full bs=8"
    ):
        check(two, budgets(spec))


# --- baseline --------------------------------------------------------------------------------------------------


def test_baseline_round_trips_and_keeps_ratios() -> None:
    rows = normalise(frame([*cpu_rows(), row("lora", 16, knob=8, device="cpu", status="error", suite="smoke")]))
    keep = budgets(
        {
            "ratios": [
                {"name": "linear-half", "select": {"tuner": "linear"}, "versus": {"tuner": "full"}, "max_ratio": 0.5}
            ]
        }
    )
    baseline = propose_baseline(rows, 1.05, "petlbench check results/smoke --write-baseline b.yaml", keep)
    assert (baseline.budgets, baseline.ratios, baseline.rows, baseline.skipped) == (5, 1, 5, 1)
    assert "# Regenerate: petlbench check results/smoke --write-baseline b.yaml" in baseline.text
    parsed = Budgets.model_validate(yaml.safe_load(baseline.text))
    lora = next(b for b in parsed.budgets if b.select.tuner == "lora")
    assert lora.select.knob == 8 and lora.select.batch_size == 8 and lora.select.memory_source == "cpu_tracker"
    assert lora.max_peak_allocated_bytes == -(-16 * MiB * 105 // 100)  # × 1.05, rounded up
    assert lora.max_params_trainable == 5_000  # exact
    assert all(b.min_train_images_per_s is None for b in parsed.budgets)
    assert parsed.ratios == keep.ratios
    assert all(c.passed for c in check(rows[rows["status"] == "ok"], parsed))


def test_baseline_names_the_variant_when_a_tuner_has_several() -> None:
    """`tuner: dtl` alone also selects the dtl+ rows; the plain variant's limit would then fail dtl+."""
    rows = normalise(
        frame(
            [
                row("dtl", 8, knob=2, device="cpu", peak=8 * MiB, params=1_418, suite="smoke", method="dtl"),
                row("dtl", 8, knob=2, device="cpu", peak=9 * MiB, params=1_994, suite="smoke", method="dtl+"),
            ]
        )
    )
    baseline = propose_baseline(rows, 1.05, "regen")
    parsed = Budgets.model_validate(yaml.safe_load(baseline.text))
    assert sorted(str(b.select.method) for b in parsed.budgets) == ["dtl", "dtl+"]
    assert all(c.passed for c in check(rows, parsed))


def test_baseline_rejects_headroom_below_one() -> None:
    with pytest.raises(ConfigError, match="--headroom: must be >= 1"):
        propose_baseline(normalise(frame(cpu_rows())), 0.9, "cmd")


# --- CLI -----------------------------------------------------------------------------------------------------


def write_budgets(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_cli_exit_codes(tmp_path: Path) -> None:
    results = write(cpu_rows(), tmp_path / "results" / "smoke")
    runner = CliRunner()
    ok = write_budgets(
        tmp_path / "ok.yaml", "budgets:\n  - select: {tuner: linear}\n    max_peak_allocated_bytes: 30MiB\n"
    )
    result = runner.invoke(app, ["check", "--budgets", str(ok), str(results)])
    assert result.exit_code == 0, result.output
    assert "2 within budget, 0 over; 3 rows no budget selects" in flat(result.output)

    over = write_budgets(
        tmp_path / "over.yaml", "budgets:\n  - select: {tuner: linear}\n    max_peak_allocated_bytes: 15MiB\n"
    )
    result = runner.invoke(app, ["check", "--budgets", str(over), str(results)])
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert "FAIL linear bs=16" in text and "PASS linear bs=8" in text
    assert "error: 1 check(s) failed: linear bs=16 (smoke fp32 cpu) peak_allocated_bytes" in text
    assert "peak_allocated_bytes 20.00 MiB > 15.00 MiB (budgets[0], run smoke-linear-" in text
    assert "regenerate the budgets and review the diff: petlbench check" in text

    unmatched = write_budgets(
        tmp_path / "none.yaml", "budgets:\n  - select: {tuner: sqt}\n    max_params_trainable: 1\n"
    )
    result = runner.invoke(app, ["check", "--budgets", str(unmatched), str(results)])
    assert result.exit_code == 2
    assert "budgets[0].select: selects no result row (tuner=sqt)" in flat(result.output)

    malformed = write_budgets(
        tmp_path / "bad.yaml", "budgets:\n  - select: {tuner: linear}\n    max_peak_alocated_bytes: 1\n"
    )
    result = runner.invoke(app, ["check", "--budgets", str(malformed), str(results)])
    assert result.exit_code == 2
    assert f"{malformed}: budgets[0].max_peak_alocated_bytes: unknown key" in flat(result.output)

    result = runner.invoke(app, ["check", "--budgets", str(tmp_path / "missing.yaml"), str(results)])
    assert result.exit_code == 2 and "no such file" in flat(result.output)


def test_cli_write_baseline_then_check_passes(tmp_path: Path) -> None:
    results = write(cpu_rows(), tmp_path / "results" / "smoke")
    target = tmp_path / "budgets.yaml"
    runner = CliRunner()
    result = runner.invoke(app, ["check", str(results), "--write-baseline", str(target), "--headroom", "1.02"])
    assert result.exit_code == 0, result.output
    command = f"petlbench check {results} --write-baseline {target} --headroom 1.02"
    assert command in flat(result.output)
    assert f"# Regenerate: {command}" in target.read_text()
    assert runner.invoke(app, ["check", "--budgets", str(target), str(results)]).exit_code == 0


def test_committed_budgets_follow_the_cpu_rules() -> None:
    """suites/budgets.yaml: bytes only on cpu_tracker rows, no images/s floors on CPU, at least one ratio."""
    committed = load_budgets(REPO / "suites" / "budgets.yaml")
    assert committed.ratios
    for budget in committed.budgets:
        byte_limits = (budget.max_peak_allocated_bytes, budget.max_peak_reserved_bytes, budget.max_peak_infer_bytes)
        if any(limit is not None for limit in byte_limits):
            assert budget.select.memory_source == "cpu_tracker", budget
        if budget.select.device == "cpu":
            assert budget.min_train_images_per_s is None, budget


def test_a_crashed_run_fails_its_budget_instead_of_hiding_it(tmp_path: Path) -> None:
    """A run that crashed before measuring has no memory_source; budgets selecting cpu_tracker rows still see it."""
    crashed = row("lora", 8, knob=8, device="cpu", status="error", suite="smoke", error="RuntimeError: boom\ntrace")
    crashed["memory_source"] = None
    results = write([*cpu_rows()[:2], crashed], tmp_path / "results" / "smoke")
    budgets = write_budgets(
        tmp_path / "b.yaml",
        "budgets:\n"
        "  - select: {tuner: lora, memory_source: cpu_tracker}\n    max_peak_allocated_bytes: 30MiB\n"
        "  - select: {tuner: linear, memory_source: cpu_tracker}\n    max_peak_allocated_bytes: 30MiB\n",
    )
    result = CliRunner().invoke(app, ["check", "--budgets", str(budgets), str(results)])
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert "FAIL lora rank=8 bs=8 peak [1] ≤ 30.00 MiB" in text
    assert "[1] lora rank=8 bs=8: run ended error: RuntimeError: boom" in text
    assert "error: 1 check(s) failed: lora rank=8 bs=8 (smoke fp32 cpu) peak_allocated_bytes: run ended error" in text
    assert "regenerate" not in text  # nothing is over budget: re-running, not re-baselining, is the fix
