"""Terminal output that fits: at 80 columns no number, knob or status is cut ('54… KiB', 'num_queri…', 'P…'),
at 200 columns the full tables show; and the `run` flags that the real run refuses are refused by --dry-run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.cli.tables import summary_table
from petlbench.columns import Metrics
from petlbench.results import RunResult
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite
from petlbench.tuners import TUNERS
from tests.report_rows import MiB, row, write

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "suites" / "smoke.yaml")
CUT = re.compile(r"…")
TINY = """\
name: narrow
device: cpu
data: {name: synthetic, num_classes: 10}
backbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 1}}
measure: {warmup_steps: 2, steps: 1, inference: false}
batch_size: [4, 8]
tuners:
  - tuner: sqt
    grid: {num_queries: [4, 16, 32]}
  - tuner: lora
"""


def cli(*args: str, columns: int) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with a terminal `columns` wide (stdout is a pipe: COLUMNS decides)."""
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "petlbench", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def assert_fits(text: str, columns: int) -> None:
    assert not CUT.search(text), text
    too_wide = [line for line in text.splitlines() if len(line) > columns and " " in line.strip()]
    # soft-wrapped one-line messages may be longer; table lines never are
    assert not [line for line in too_wide if any(c in line for c in "│┃┏┗━─")], too_wide


def results(tmp_path: Path) -> Path:
    rows = [
        row("sqt", 8, knob=q, knob_name="num_queries", peak=(54.3 + q) * 1024, device="cpu", suite="narrow")
        for q in (4, 16, 32)
    ]
    rows.append(row("full", 8, peak=1234.5 * MiB, params=85_800_000, device="cpu", suite="narrow"))
    return write(rows, tmp_path / "results" / "narrow")


def test_tuners_fits_one_screen_at_80_columns() -> None:
    done = cli("tuners", columns=80)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) <= 40, done.stdout
    assert max(len(line.rstrip()) for line in lines) <= 80, done.stdout
    for name, cls in TUNERS.items():  # one line each, with the headline knob and its default
        line = next(line for line in lines if line.split()[:1] == [name])
        assert cls.knob is None or f"{cls.knob}={cls.model_fields[cls.knob].default}" in line, line
    assert done.stdout.count("backbone_mode") == 1  # the knobs every tuner shares are described once


@pytest.mark.slow
def test_no_command_cuts_a_number_at_80_columns(tmp_path: Path) -> None:
    suite = tmp_path / "narrow.yaml"
    suite.write_text(TINY)
    folder = results(tmp_path)
    budgets = tmp_path / "budgets.yaml"
    assert cli("check", str(folder), "--write-baseline", str(budgets), columns=80).returncode == 0
    for columns in (80, 200):
        # at 200 columns only the estimate table changes (it drops columns when narrow); the rest fit at 80 alone
        outputs: dict[str, subprocess.CompletedProcess[str]] = (
            {}
            if columns == 200
            else {
                "tuners": cli("tuners", columns=columns),
                "validate": cli("validate", SMOKE, columns=columns),
                "dry-run": cli("run", str(suite), "--dry-run", "--results-dir", str(tmp_path / "r"), columns=columns),
                "check": cli("check", str(folder), "--budgets", str(budgets), columns=columns),
            }
        )
        outputs["estimate"] = cli(
            "estimate",
            str(suite),
            "--device-memory",
            "1GiB,2GiB",
            "--jobs",
            "1",
            "--results-dir",
            str(tmp_path / "e"),
            columns=columns,
        )
        for name, done in outputs.items():
            assert done.returncode == 0, (name, done.stdout, done.stderr)
            assert_fits(done.stdout, columns)
        # the three SQT settings stay distinguishable, and PASS is spelled out
        for q in (4, 16, 32):
            assert f"num_queries={q}" in outputs["estimate"].stdout
            assert columns == 200 or f"num_queries={q}" in outputs["dry-run"].stdout
        assert columns == 200 or "PASS" in outputs["check"].stdout
        assert "largest batch predicted to fit" in outputs["estimate"].stdout
        if columns == 200:  # wide: the full table, nothing dropped
            assert "not shown at this width" not in outputs["estimate"].stdout
            assert "weights" in outputs["estimate"].stdout


def fake_results() -> list[RunResult]:
    suite = parse_suite(
        {
            "name": "x",
            "device": "cpu",
            "backbone": {"model": "test_vit", "img_size": 32},
            "data": {"name": "synthetic", "num_classes": 10},
            "batch_size": 8,
            "tuners": [{"tuner": "sqt", "grid": {"num_queries": [4, 16, 32]}}, {"tuner": "full"}],
        }
    )
    out = []
    for i, spec in enumerate(expand(suite, "cpu")):
        metrics = Metrics(
            params_trainable=1_234_567 * (i + 1),
            peak_allocated_bytes=55_603 + 1_000_000 * i,
            mem_weights_bytes=12_345,
            mem_grads_bytes=0,
            mem_optimizer_bytes=24_690,
            mem_activations_bytes=1_048_576,
            train_images_per_s=1234.5,
        )
        out.append(RunResult(spec=spec, status="ok", metrics=metrics, created_at="2026-01-01T00:00:00+00:00"))
    return out


@pytest.mark.parametrize("columns", [80, 200])
def test_the_run_summary_fits(columns: int) -> None:
    console = Console(width=columns, record=True, color_system=None)
    console.print(summary_table(fake_results(), title="x: 4 runs"))
    text = console.export_text()
    assert_fits(text, columns)
    for q in (4, 16, 32):
        assert f"num_queries={q}" in text
    assert "1,234,567" in text and "54.3 KiB" in text
    assert ("not shown at this width" in text) == (columns == 80)


def test_dry_run_refuses_what_the_run_refuses_and_says_when_nothing_is_left(tmp_path: Path) -> None:
    runner = CliRunner()
    refused = runner.invoke(app, ["run", SMOKE, "--skip-predicted-oom", "--dry-run", "--results-dir", str(tmp_path)])
    assert refused.exit_code == 2 and "--memory-limit: required for CPU runs" in refused.output
    # every run already stored: the dry run says there is nothing to run
    suite = tmp_path / "one.yaml"
    suite.write_text(TINY.replace("batch_size: [4, 8]", "batch_size: 4").replace("name: narrow", "name: one"))
    for spec in expand(load_suite(suite), "cpu"):
        write([row(str(spec.tuner), 4, device="cpu", suite="one", run_id=spec.run_id)], tmp_path / "one")
    done = runner.invoke(app, ["run", str(suite), "--dry-run", "--results-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "nothing to run" in done.output


def test_the_eta_is_seeded_before_the_first_run_finishes() -> None:
    import io

    from rich.progress import Progress

    from petlbench.cli.console import SeededEta

    column = SeededEta()
    progress = Progress(column, console=Console(file=io.StringIO()))
    task = progress.add_task("x", total=10, seed_s=30.0, parallel=2)
    progress.start_task(task)
    text = column.render(progress.tasks[0]).plain
    assert text.startswith("~"), text
    hours, minutes, seconds = (int(p) for p in text.removeprefix("~").split(":"))
    left = 3600 * hours + 60 * minutes + seconds
    assert 140 <= left <= 150  # 10 runs × 30 s over 2 workers, less the (tiny) time elapsed
    unseeded = progress.add_task("y", total=10)
    assert column.render(progress.tasks[unseeded]).plain == "-:--:--"
