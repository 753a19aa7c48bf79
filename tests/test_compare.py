"""`petlbench compare A B`: runs joined by run_id (else spec), deltas sorted by size, exit 1 on a memory regression."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.report.compare import compare_rows
from petlbench.report.rows import load_rows
from tests.report_rows import GiB, row, write

runner = CliRunner()


def folders(tmp_path: Path, lora_growth: float, suite_b: str = "mem") -> tuple[Path, Path]:
    base = [
        row("full", 32, peak=20 * GiB, ips=300, run_id="full-32"),
        row("lora", 32, knob=8, peak=4 * GiB, ips=900, acc=0.80, run_id="lora-32"),
        row("linear", 32, peak=2 * GiB, ips=1400, run_id="linear-32"),
        row("vpt", 32, knob=10, knob_name="prompt_len", peak=5 * GiB, run_id="vpt-32"),
    ]
    change = [
        row("full", 32, peak=19 * GiB, ips=330, run_id="full-32" if suite_b == "mem" else "other-1", suite=suite_b),
        row("lora", 32, knob=8, peak=4 * GiB * (1 + lora_growth), ips=850, acc=0.82, run_id="lora-32", suite=suite_b),
        row("linear", 32, peak=2 * GiB, ips=1400, run_id="linear-32", suite=suite_b),
        row("vpt", 32, knob=10, knob_name="prompt_len", status="oom", run_id="vpt-32", suite=suite_b),
    ]
    return write(base, tmp_path / "a" / "mem"), write(change, tmp_path / "b" / suite_b)


def test_deltas_are_joined_run_by_run_and_sorted_by_size(tmp_path: Path) -> None:
    a, b = folders(tmp_path, 0.10, suite_b="renamed")
    comparison = compare_rows(load_rows([a]), load_rows([b]))
    labels = [d.label for d in comparison.deltas]
    # lora +10 % before full −5 % before linear 0 %; vpt went ok → oom, so it has no delta but is counted
    assert labels == ["lora rank=8 bs=32 fp32", "full bs=32 fp32", "linear bs=32 fp32"]
    lora, full = comparison.deltas[0], comparison.deltas[1]
    assert lora.relative("peak_allocated_bytes") == pytest.approx(4.4 / 4 - 1)
    assert full.relative("train_images_per_s") == pytest.approx(330 / 300 - 1)
    assert lora.absolute("acc_top1") == pytest.approx(0.82 - 0.80)
    assert comparison.matched_by_spec == 1  # full has another run_id in the renamed suite: matched by spec
    assert comparison.broke == ["vpt prompt_len=10 bs=32 fp32"]
    assert [d.label for d in comparison.regressions(0.01)] == ["lora rank=8 bs=32 fp32"]
    assert comparison.regressions(0.2) == []


def test_compare_exit_code_gates_on_memory_increase(tmp_path: Path) -> None:
    a, b = folders(tmp_path / "x", 0.005)
    # +0.5 % is within the default 1 %, but vpt is no longer ok: a regression
    broke = runner.invoke(app, ["compare", str(a), str(b)])
    assert broke.exit_code == 1 and "1 runs no longer ok" in broke.output, broke.output
    # the same change without the broken run: within budget, exit 0; with a 0.1 % budget, exit 1
    for path in b.glob("*.parquet"):
        if "vpt" in path.name:
            path.unlink()
    for path in a.glob("*.parquet"):
        if "vpt" in path.name:
            path.unlink()
    ok = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp.png")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert "+0.5%" in ok.output and "-5.0%" in ok.output
    strict = runner.invoke(app, ["compare", str(a), str(b), "--max-increase", "0.1"])
    assert strict.exit_code == 1 and "over +0.1% peak memory" in strict.output


def test_compare_help_ends_with_an_example() -> None:
    result = runner.invoke(app, ["compare", "--help"])
    assert result.exit_code == 0
    assert "Example: petlbench compare" in result.output


def _timed(run_id: str, ips: float, iqr: float, unstable: bool = False) -> dict[str, object]:
    """A row whose 32-image step takes 32/ips s with interquartile range `iqr` (a fraction of that median)."""
    median = 32 / ips
    return row(
        "lora",
        32,
        knob=8,
        peak=4 * GiB,
        ips=ips,
        run_id=run_id,
        step_time_median_s=median,
        step_time_iqr_s=iqr * median,
        timing_unstable=unstable,
    )


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        ((1000, 0.02), (800, 0.02), "change"),  # 25 % slower, IQRs of 2 %: a change
        ((1000, 0.30), (800, 0.30), "noise"),  # the same medians, IQRs of 30 %: within the spread
        ((1000, 0.02), (800, 0.02, True), "unstable"),  # a flagged side is never a change
    ],
)
def test_a_throughput_change_is_a_change_only_outside_the_timing_noise(
    tmp_path: Path, before: tuple[float, ...], after: tuple[float, ...], verdict: str
) -> None:
    a = write([_timed("r", *before)], tmp_path / "a" / "mem")  # type: ignore[arg-type]
    b = write([_timed("r", *after)], tmp_path / "b" / "mem")  # type: ignore[arg-type]
    (delta,) = compare_rows(load_rows([a]), load_rows([b])).deltas
    assert delta.speed_verdict() == verdict
    shown = runner.invoke(app, ["compare", str(a), str(b)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.output.splitlines() if line.startswith("lora"))
    marked = {"change": "-20.0%", "noise": "~-20.0%", "unstable": "-20.0% unstable"}[verdict]
    assert marked in line, line
    if verdict != "change":
        assert "within timing noise" in shown.output


def test_compare_colours_only_real_throughput_changes() -> None:
    from rich.console import Console

    from petlbench.cli.tables import compare_table
    from petlbench.report.compare import Comparison, Delta, Timing

    def delta(label: str, iqr: float, unstable: bool = False) -> Delta:
        values = {"peak_allocated_bytes": (1.0, 1.0), "train_images_per_s": (1000.0, 800.0), "acc_top1": (None, None)}
        timing = (Timing(0.032, iqr, False), Timing(0.04, iqr, unstable))
        return Delta(label, "x", values, timing)

    deltas = [delta("slower", 0.001), delta("noisy", 0.05), delta("flagged", 0.001, True)]
    console = Console(record=True, width=200, color_system="truecolor")
    console.print(compare_table(Comparison(deltas, 0, 0), 10))
    lines = {line.split()[0]: line for line in console.export_text(styles=True).splitlines() if "20.0%" in line}
    colours = ("\x1b[31m", "\x1b[32m", "\x1b[91m", "\x1b[92m")
    assert "\x1b[31m" in lines["slower"]  # red: a real slowdown
    assert not any(code in lines["noisy"] or code in lines["flagged"] for code in colours)
