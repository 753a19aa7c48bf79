"""What the figures show, read back from their artists: one colour + marker per method everywhere, and a report
of an estimate folder that says 'predicted' everywhere, draws the device memory, and has no empty panel."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.markers import MarkerStyle
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from petlbench.report import build_report
from petlbench.report.fit import Fit, largest_fitting
from petlbench.report.views import ReportContext
from tests.report_rows import GiB, row, sweep, write

_MARKERS = ("o", "s", "^", "v", "<", ">", "D", "d", "p", "h", "P", "*", "X")


def _marker_of(collection: PathCollection) -> str:
    """Which marker a scatter drew, by comparing its path with each marker's path."""
    path = collection.get_paths()[0]
    for name in _MARKERS:
        style = MarkerStyle(name)
        ref = style.get_path().transformed(style.get_transform())
        if ref.vertices.shape == path.vertices.shape and np.allclose(ref.vertices, path.vertices):
            return name
    raise AssertionError(f"unknown marker path {path.vertices[:3]}")


def capture(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Every figure build_report saves, by file stem."""
    figures: dict[str, Figure] = {}
    original = ReportContext.save

    def keep(self: ReportContext, fig: Figure, stem: str) -> Path:
        figures[stem] = fig
        return original(self, fig, stem)

    monkeypatch.setattr(ReportContext, "save", keep)
    return figures


def identities(figures: dict[str, Figure]) -> dict[str, set[tuple[str, str]]]:
    """method → every (colour, marker) it was drawn with ('-' for a tick label, which has no marker)."""
    seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for fig in figures.values():
        for artist in fig.findobj(lambda a: str(a.get_gid() or "").startswith("method=")):
            method = str(artist.get_gid()).removeprefix("method=")
            if isinstance(artist, Line2D):
                seen[method].add((to_hex(artist.get_color()), str(artist.get_marker())))
            elif isinstance(artist, PathCollection):
                seen[method].add((to_hex(artist.get_facecolor()[0]), _marker_of(artist)))
            elif isinstance(artist, Text):
                seen[method].add((to_hex(artist.get_color()), "-"))
    return seen


def other_suite() -> list[dict[str, Any]]:
    """A second suite with a different set of methods (a plugin among them), so sorted-order colours would differ."""
    rows = []
    for batch in (8, 16):
        rows.append(row("linear", batch, peak=(1 + batch / 8) * GiB, params=7_000, suite="other"))
        rows.append(row("sqt", batch, knob=4, knob_name="num_queries", peak=2 * batch * GiB / 8, suite="other"))
        rows.append(row("bitfit", batch, peak=(1.5 + batch / 8) * GiB, params=9_000, suite="other"))
        rows.append(row("my-plugin", batch, peak=(1.2 + batch / 8) * GiB, params=8_000, suite="other"))
    return rows


def test_a_method_has_one_colour_and_marker_in_every_figure_and_across_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = capture(monkeypatch)
    build_report([write(sweep(), tmp_path / "a")], out=tmp_path / "ra")
    second = capture(monkeypatch)
    build_report([write(other_suite(), tmp_path / "b")], out=tmp_path / "rb")

    a, b = identities(first), identities(second)
    assert {"full", "linear", "lora"} <= set(a) and {"linear", "sqt", "my-plugin"} <= set(b)
    both: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for seen in (a, b):
        for method, looks in seen.items():
            both[method] |= looks
    for method, looks in both.items():
        colours = {c for c, _ in looks}
        markers = {m for _, m in looks if m != "-"}
        assert len(colours) == 1, (method, looks)  # same colour in pareto, memory-batch and breakdown, both reports
        assert len(markers) == 1, (method, looks)
    # distinct methods are told apart: no two share colour *and* marker
    pairs = [
        (next(iter({c for c, _ in looks})), next(iter({m for _, m in looks if m != "-"}))) for looks in both.values()
    ]
    assert len(set(pairs)) == len(pairs)
    # the linear probe was drawn in every figure type of the first report
    figure_kinds = {stem.split("-")[0] for stem in first}
    assert {"pareto", "memory", "breakdown"} <= figure_kinds


def estimate_rows() -> list[dict[str, Any]]:
    """What `petlbench estimate --device cuda --device-memory 80GiB` stores: no throughput, no GPU name."""
    rows = []
    methods = [("full", None, None, 10.0), ("linear", None, None, 0.8), ("lora", 4, "rank", 3.0)]
    methods += [("lora", 8, "rank", 3.02), ("sqt", 16, "num_queries", 1.5), ("fact", 8, "rank", 2.5)]
    for tuner, knob, knob_name, per_batch in methods:
        for batch in (16, 32, 64, 128):
            extra = {"memory_source": "estimate", "memory_limit_bytes": 80 * GiB, "attn_kernel": "cpu_flash"}
            rows.append(
                row(
                    tuner,
                    batch,
                    knob=knob,
                    knob_name=knob_name,
                    peak=(1 + per_batch * batch / 16) * GiB,
                    ips=None,
                    suite="mem.estimate",
                    gpu_memory=None,
                    **{"env.gpu_name": None, **extra},
                )
            )
    return rows


def _has_data(ax: Any) -> bool:
    return bool(ax.lines or ax.collections or [p for p in ax.patches if isinstance(p, Rectangle)])


def test_an_estimate_report_says_predicted_everywhere_draws_the_limit_and_shows_what_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = capture(monkeypatch)
    out = tmp_path / "report"
    summary = build_report([write(estimate_rows(), tmp_path / "mem.estimate")], out=out)
    assert figures and len(summary.figures) == len(figures)
    assert not any("throughput" in stem for stem in figures)  # estimates have no throughput: no empty view
    assert any(stem.startswith("fit-") for stem in figures)
    for stem, fig in figures.items():
        title = fig.get_suptitle()
        assert "predicted" in title.lower(), (stem, title)
        assert "cpu_flash" not in title, (stem, title)  # the CPU trace's kernel is not what a GPU runs
        for ax in fig.axes:
            assert _has_data(ax), (stem, ax.get_title())
    limit_lines = [
        line
        for line in figures[next(s for s in figures if s.startswith("memory-batch"))].axes[0].lines
        if len(set(line.get_ydata())) == 1 and to_hex(line.get_color()) == "#d62728"
    ]
    assert [float(line.get_ydata()[0]) for line in limit_lines] == [pytest.approx(80.0)]  # 80 GiB, axis in GiB

    md = (out / "report.md").read_text()
    section = md[md.index("## 1.") : md.index("## Failed runs")]
    headings = [line for line in section.splitlines() if line.startswith("###")]
    assert headings and all("Predicted" in h for h in headings), headings
    assert "caching allocator's peak" not in md and "80.0 GiB" in md
    assert "| method | 24 GiB | 48 GiB | 80 GiB |" in md
    # full grows 10 GiB per 16 images (+1 GiB): 48 GiB holds batch 64 (41 GiB), not 128 (81 GiB)
    assert "| full | 32 | 64 | 64 |" in md
    assert "| linear | 128+ | 128+ | 128+ |" in md


def test_largest_fitting_reads_a_sweep_in_order() -> None:
    peaks = [(64, 30.0), (16, 10.0), (32, 20.0), (128, None)]
    assert largest_fitting(peaks, 25.0) == Fit(32, False)
    assert largest_fitting(peaks, 5.0) == Fit(None, False)
    assert largest_fitting(peaks, 1000.0) == Fit(64, False)  # 128 did not finish: not a fit
    assert largest_fitting(peaks[:3], 1000.0) == Fit(64, True)
    assert Fit(64, True).text() == "64+" and Fit(None, False).text() == "none"


def test_paper_format_writes_pdf_with_truetype_fonts_at_column_width(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = capture(monkeypatch)
    out = tmp_path / "paper"
    build_report([write(other_suite(), tmp_path / "b")], out=out, fmt="pdf", width="single")
    pdfs = sorted(out.glob("*.pdf"))
    assert pdfs and len(pdfs) == len(figures) == len(list(out.glob("*.svg")))
    assert all(fig.get_figwidth() == pytest.approx(3.3) for fig in figures.values())
    data = pdfs[0].read_bytes()
    assert b"/FontFile2" in data and b"/Type3" not in data  # TrueType embedded (fonttype 42), not Type 3
    import matplotlib

    assert matplotlib.rcParams["pdf.fonttype"] == 3  # the global state was left alone
