"""The view registry: `--plot`'s choices, figure removal and the layout derive from it; progress per view × group."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.cli.report_view import PlotChoice
from petlbench.report import build_report
from petlbench.report import views as registry
from petlbench.report.document import Heading
from petlbench.report.views import VIEWS, GroupView, Rendered, ReportContext, Section, build_registry, plot_choices
from tests.report_rows import GiB, row, write


class Dots(GroupView):
    """A view the package does not have: one figure per group, named by its declared prefix."""

    name = "dots"
    title = "dots figure"
    figures: ClassVar[tuple[str, ...]] = ("dots",)
    stem = "dots"

    def render(self, ctx: ReportContext, section: Section) -> Rendered:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1, 1))
        fig.subplots().plot([0, 1], [0, 1])
        out = Rendered([Heading(f"Dots of group {section.number}", 3)])
        out.image(ctx.save(fig, f"{self.stem}-{section.group.slug}"), "dots")
        return out


def two_groups(folder: Path) -> Path:
    rows = [
        row(tuner, 8, peak=peak * GiB, precision=precision)
        for tuner, peak in (("linear", 1), ("full", 2))
        for precision in ("fp32", "bf16-mixed")
    ]
    return write(rows, folder)


def test_a_registered_view_is_a_plot_choice_and_replaces_its_old_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "VIEWS", build_registry([*VIEWS.values(), Dots]))
    assert "dots" in plot_choices() and plot_choices()[-1] == "all"
    assert "dots" in [choice.value for choice in registry.plot_enum()]
    out = tmp_path / "report"
    out.mkdir()
    for name in ("dots-old-group.png", "dots-old-group.svg", "dotsy.png", "notes.png"):
        (out / name).write_bytes(b"x")

    summary = build_report([two_groups(tmp_path / "r")], ["dots"], out)

    slugs = ["mem-nvidia-h100-80gb-hbm3-bf16-mixed", "mem-nvidia-h100-80gb-hbm3-fp32"]
    assert sorted(p.name for p in summary.figures) == [f"dots-{slug}.png" for slug in slugs]
    assert not (out / "dots-old-group.png").exists() and not (out / "dots-old-group.svg").exists()
    assert (out / "dotsy.png").exists() and (out / "notes.png").exists()  # not a view's figure: left alone
    drawn = [p.name for p in summary.figures]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["dotsy.png", "notes.png", *drawn])
    md = summary.markdown.read_text()
    assert "### Dots of group 1" in md and "### Dots of group 2" in md and "## Failed runs" in md
    assert "### Pareto fronts" not in md  # not selected


def test_a_figure_no_view_declares_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stray(Dots):
        name = "stray"
        figures: ClassVar[tuple[str, ...]] = ("stray",)
        stem = "scatter"  # not its declared prefix: an old 'scatter-*' would never be removed

    monkeypatch.setattr(registry, "VIEWS", build_registry([*VIEWS.values(), Stray]))
    with pytest.raises(TypeError, match=r"figure 'scatter-mem-[^']*': its prefix is no view's `figures`"):
        build_report([two_groups(tmp_path / "r")], ["stray"], tmp_path / "report")


def test_registry_refuses_a_shared_figure_prefix_and_a_dangling_part_of() -> None:
    class Clash(Dots):
        name = "clash"

    with pytest.raises(TypeError, match="figure prefix 'dots' of view 'clash'"):
        build_registry([Dots, Clash])

    class Orphan(Dots):
        name = "orphan"
        figures: ClassVar[tuple[str, ...]] = ()
        part_of = "nothing"

    with pytest.raises(TypeError, match="part_of 'nothing'"):
        build_registry([Orphan])


def test_the_cli_offers_the_registry_s_choices_and_names_report_html_last(tmp_path: Path) -> None:
    assert [choice.value for choice in PlotChoice] == list(plot_choices())
    assert {"pareto", "memory-batch", "fit", "breakdown", "timeline"} <= set(plot_choices())
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(two_groups(tmp_path / "r")), "--plot", "fit", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"report: {out / 'report.html'}  (also report.md)"
    assert not list(out.glob("*.png"))  # the fit view draws estimate groups only


def test_progress_is_reported_per_view_and_group(tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    summary = build_report(
        [two_groups(tmp_path / "r")],
        ["pareto", "memory-batch"],
        tmp_path / "report",
        on_progress=lambda done, total, label: calls.append((done, total, label)),
    )
    # overview; per group pareto, memory-batch and fit (part of memory-batch); failed runs (no VTAB rows)
    total = 1 + 2 * 3 + 1
    assert {t for _, t, _ in calls} == {total}
    assert [d for d, _, _ in calls] == list(range(total + 1))
    labels = [label for _, _, label in calls]
    assert labels[0] == "overview" and labels[-2] == "failures"
    slugs = [Path(p).stem.removeprefix("memory-batch-") for p in summary.figures if "memory-batch" in p.name]
    assert len(slugs) == 2
    for slug in slugs:
        assert [f"{view} · {slug}" for view in ("pareto", "memory-batch", "fit")] == [
            label for label in labels if label.endswith(f" · {slug}")
        ]


def test_a_group_lacking_a_view_s_columns_skips_it_with_a_note(tmp_path: Path) -> None:
    bare = {"mem_weights_bytes": None, "precision": "bf16-mixed"}
    rows = [
        *(row(tuner, 8, peak=peak * GiB) for tuner, peak in (("linear", 1), ("full", 2))),
        *(row(tuner, 8, peak=peak * GiB, ips=None, **bare) for tuner, peak in (("linear", 1), ("full", 2))),
    ]
    summary = build_report([write(rows, tmp_path / "r")], ["pareto", "breakdown"], tmp_path / "report")

    bare_title = next(title for title in summary.groups if "bf16-mixed" in title)
    full_title = next(title for title in summary.groups if "fp32" in title)
    assert f"{bare_title}: no breakdown figure (no ok run has a breakdown)" in summary.notes
    assert f"{bare_title}: no training throughput vs peak memory figure (no ok point has img/s)" in summary.notes
    assert not [n for n in summary.notes if n.startswith(full_title) and ("breakdown" in n or "throughput" in n)]
    names = {p.name for p in summary.figures}
    assert "breakdown-mem-nvidia-h100-80gb-hbm3-fp32.png" in names
    assert not [n for n in names if "bf16" in n and (n.startswith("breakdown") or "throughput" in n)]
    md = summary.markdown.read_text()
    assert md.count("No breakdown: no ok run has a breakdown.") == 1


def test_the_html_report_shows_no_markdown_markup(tmp_path: Path) -> None:
    """Emphasis in report text is **bold** (both renderings turn it into markup), never a literal *star*."""
    rows = [row("lora", 8, knob=8, peak=1e6), row("full", 8, peak=2e6)]
    summary = build_report([write(rows, tmp_path / "r" / "mem")], ["breakdown"], tmp_path / "out")
    html = summary.html.read_text()
    assert "*at the peak*" not in html and "<strong>at the peak</strong>" in html
    assert not re.search(r"(?<![*\w])\*[a-z][^*<>]*\*(?![*\w])", html.split("<body>")[1]), "a literal *...* in the HTML"
