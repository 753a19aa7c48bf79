"""The timing protocol: how long steps are timed, the dispersion of a row, and what reports do with unstable rows."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from petlbench.measure.speed import Timing, time_more
from petlbench.report.frame import points
from petlbench.report.pareto import THROUGHPUT, WITHOUT_ACCURACY, frontier_flags
from petlbench.report.rows import normalise
from petlbench.run.worker import execute
from petlbench.spec.models import MeasureSpec, TimingProtocol
from tests.report_rows import frame, row
from tests.test_worker import spec

CPU = torch.device("cpu")


def test_timing_goes_on_until_count_and_duration_are_both_reached() -> None:
    calls = itertools.count()
    protocol = TimingProtocol(min_steps=3, min_time_s=0.05, max_steps=500, max_dispersion=0.1)
    timing = time_more(lambda: next(calls), Timing([0.001, 0.001, 0.001]), protocol, CPU)
    assert sum(timing.times_s) >= 0.05 or len(timing.times_s) == 500
    assert len(timing.times_s) > 3  # three steps of 1 ms are not 50 ms of timing


def test_timing_stops_at_its_cap_and_never_below_the_memory_window() -> None:
    protocol = TimingProtocol(min_steps=5, min_time_s=3600.0, max_steps=8, max_dispersion=0.1)
    assert len(time_more(lambda: None, Timing([0.0] * 5), protocol, CPU).times_s) == 8
    done = TimingProtocol(min_steps=2, min_time_s=0.0, max_steps=8, max_dispersion=0.1)
    assert len(time_more(lambda: None, Timing([1.0, 1.0]), done, CPU).times_s) == 2


def test_dispersion_is_iqr_over_median() -> None:
    steady = Timing([1.0, 1.0, 1.0, 1.0, 1.0])
    busy = Timing([1.0, 1.0, 2.0, 3.0, 9.0])
    assert steady.iqr_s == 0.0 and steady.dispersion == 0.0
    assert busy.iqr_s == 2.0 and busy.dispersion == 1.0
    assert MeasureSpec().timing == TimingProtocol(min_steps=5, min_time_s=0.5, max_steps=50, max_dispersion=0.1)


def test_rows_carry_the_dispersion_and_the_flag() -> None:
    result = execute(spec(measure={"warmup_steps": 2, "steps": 2, "min_time_s": 0.05, "max_steps": 40}))
    m = result.metrics
    assert result.status == "ok", result.error
    assert m.timed_steps is not None and 2 <= m.timed_steps <= 40
    assert m.step_time_iqr_s is not None and m.step_time_iqr_s >= 0
    assert m.timing_unstable is not None


def test_unstable_rows_never_make_a_throughput_front() -> None:
    rows = [
        row("full", 32, peak=100.0, ips=50.0),
        row("lora", 32, peak=60.0, ips=500.0, timing_unstable=True),  # would dominate if trusted
        row("linear", 32, peak=40.0, ips=10.0),
    ]
    pts = points(normalise(frame(rows)))
    spec_ = next(s for s in WITHOUT_ACCURACY if THROUGHPUT in (s.x, s.y))
    on_front = dict(zip(pts["variant"], frontier_flags(pts, spec_), strict=True))
    assert on_front == {"full": True, "linear": True, "lora": False}


def test_an_unstable_timing_is_marked_in_the_terminal_and_in_every_report_table(tmp_path: Path) -> None:
    from rich.console import Console

    from petlbench.cli.tables import result_line, summary_table
    from petlbench.columns import Metrics
    from petlbench.fmt import UNSTABLE_NOTE
    from petlbench.report import build_report
    from petlbench.results import RunResult, now_iso
    from tests.report_rows import write

    run = spec()
    metrics = Metrics(peak_allocated_bytes=1 << 20, train_images_per_s=123.0, timing_unstable=True)
    result = RunResult(spec=run, status="ok", metrics=metrics, created_at=now_iso(), duration_s=1.0)
    assert "~123 img/s" in result_line(result).plain and "timing unstable" in result_line(result).plain
    console = Console(record=True, width=200)
    console.print(summary_table([result]))
    table = console.export_text()
    assert "~123" in table and UNSTABLE_NOTE in table

    rows = [row("lora", 8, knob=8, peak=1e6, ips=321.0, timing_unstable=True), row("full", 8, peak=2e6, ips=500.0)]
    summary = build_report([write(rows, tmp_path / "r" / "mem")], ["pareto"], tmp_path / "out")
    for document in (summary.markdown, summary.html):
        text = document.read_text()
        assert "~321" in text and "~500" not in text, document
        assert "timing unstable" in text
