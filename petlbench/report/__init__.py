"""`petlbench report`: figures (PNG + SVG, + PDF in paper format), `report.md` and `report.html` from results folders.

`build_report` is the core: it reads rows (`rows.load_rows`), splits them into groups that may share a figure
(`frame.split_groups`), selects the views `--plot` asks for from the registry (`views.VIEWS`: the overview, per
group the Pareto fronts, memory vs batch size, what fits, the breakdown and the timeline, then the VTAB-1k tables
and the failed runs) and lays out what they render into the document (`document`). It never prints; the CLI says
where the files went. Matplotlib is imported only when figures are drawn, so importing this module (the CLI does)
stays cheap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from petlbench.errors import ConfigError
from petlbench.report.document import Block, Heading, Para, literal, to_html, to_markdown
from petlbench.report.frame import points, split_groups
from petlbench.report.rows import load_rows
from petlbench.report.views import (
    ALL,
    DocumentView,
    GroupView,
    Progress,
    Rendered,
    ReportContext,
    Section,
    View,
    figure_prefixes,
    plot_enum,
    select,
)
from petlbench.system import safeio

if TYPE_CHECKING:
    from enum import Enum

FORMATS: Final = ("png", "pdf")
PAPER_WIDTHS: Final = {"double": 7.0, "single": 3.3}  # inches: a two-column and a one-column figure
FIGURE_SUFFIXES: Final = (".png", ".svg", ".pdf")
Plot: Final[type[Enum]] = plot_enum()  # `--plot` choices, from the view registry


@dataclass(frozen=True)
class ReportSummary:
    """What `build_report` wrote."""

    out: Path
    markdown: Path
    html: Path
    figures: list[Path]  # PNGs; each has an SVG beside it
    groups: list[str]  # group titles, in report order
    split_by: list[str]  # the settings that differed between groups
    rows: int
    statuses: dict[str, int]
    notes: list[str] = field(default_factory=list)  # things the reader should know (e.g. a skipped figure)
    vtab_methods: int = 0  # methods in the VTAB-1k tables (0: no VTAB-1k rows, no tables)


def build_report(
    paths: Sequence[Path],
    plots: Collection[str] = (ALL,),
    out: Path = Path("reports"),
    batch_size: int | None = None,
    fmt: str = "png",
    width: str = "double",
    on_progress: Progress | None = None,
) -> ReportSummary:
    """Read every result row under `paths` and write the figures and the report into `out`.

    Args:
        paths: results folders or parquet files.
        plots: `--plot` values (`views.plot_choices()`: pareto, memory-batch, ...; "all": every one).
        out: output folder (created). Figures from an earlier report there are replaced.
        batch_size: batch size of the breakdown bars; default: the largest batch every method ran ok.
        fmt: "png" (PNG + SVG, screen sizes) or "pdf" (PDF + SVG + PNG sized for a paper, TrueType fonts).
        width: paper format only: "double" (7 in, two-column) or "single" (3.3 in, one-column).
        on_progress: called as `on_progress(done, total, label)` before each view of each group (label: the view
            and the group's file-name part) and once more with done == total when every view is drawn.

    Raises:
        ResultsError: no rows, or an unreadable results file.
        ConfigError: an unknown plot kind, format or width, or a `batch_size` no run finished at.
    """
    from petlbench.report.style import PaperFormat, paper_format

    views = select(plots)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown {fmt!r}; valid: {', '.join(FORMATS)}")
    if width not in PAPER_WIDTHS:
        raise ConfigError(f"--width: unknown {width!r}; valid: {', '.join(PAPER_WIDTHS)}")
    rows = load_rows(paths)
    groups, split_by = split_groups(rows)
    paper = PaperFormat(PAPER_WIDTHS[width]) if fmt == "pdf" else None
    ctx = ReportContext(list(paths), rows, groups, split_by, out, figure_prefixes(), batch_size, paper)
    for view in views:
        view.check(ctx)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_figures(out, ctx.figure_prefixes)
    with paper_format(paper):
        parts = _lay_out(ctx, views, on_progress or _silent)

    blocks = [block for part in parts for block in part.blocks]
    markdown = out / "report.md"
    html = out / "report.html"
    safeio.write_text(markdown, to_markdown(blocks))  # whole or not at all, never through a link
    safeio.write_text(html, to_html(blocks, "petlbench report"))
    figures = [png for part in parts for png in part.figures]
    vtab_methods = max((part.counts.get("vtab_methods", 0) for part in parts), default=0)
    titles = [g.title for g in groups]
    return ReportSummary(
        out, markdown, html, figures, titles, split_by, len(rows), ctx.statuses, ctx.notes, vtab_methods
    )


def _silent(done: int, total: int, label: str) -> None:
    pass


def _remove_old_figures(out: Path, prefixes: tuple[str, ...]) -> None:
    starts = tuple(f"{prefix}-" for prefix in prefixes)
    for path in out.iterdir():
        if path.suffix in FIGURE_SUFFIXES and path.name.startswith(starts):
            path.unlink()


def _lay_out(ctx: ReportContext, views: list[View], on_progress: Progress) -> list[Rendered]:
    """The head views, each group's heading and its views, the tail views: in registry order."""
    head = [v for v in views if isinstance(v, DocumentView) and v.place == "head" and v.applies(ctx)]
    tail = [v for v in views if isinstance(v, DocumentView) and v.place == "tail" and v.applies(ctx)]
    per_group = [v for v in views if isinstance(v, GroupView)]
    total = len(head) + len(ctx.groups) * len(per_group) + len(tail)
    done = 0
    parts: list[Rendered] = []
    for first in head:
        on_progress(done, total, first.name)
        parts.append(first.render(ctx))
        done += 1
    for number, group in enumerate(ctx.groups, 1):
        section = Section(number, group, points(group.rows))
        parts.append(Rendered(_group_heading(ctx, section)))
        for view in per_group:
            on_progress(done, total, f"{view.name} · {group.slug}")
            if (section.pts["status"] == "ok").any() and view.covers(group):
                parts.append(_render(ctx, view, section))
            done += 1
    for last in tail:
        on_progress(done, total, last.name)
        parts.append(last.render(ctx))
        done += 1
    on_progress(total, total, "done")
    return parts


def _group_heading(ctx: ReportContext, section: Section) -> list[Block]:
    group = section.group
    statuses = Counter(str(s) for s in group.rows["status"])
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    blocks: list[Block] = [
        Heading(f"{section.number}. {literal(group.title)}"),
        Para(f"{len(group.rows)} runs ({counts}); figure files end in `{group.slug}`."),
    ]
    if not (section.pts["status"] == "ok").any():
        blocks.append(Para("No run in this group finished ok: nothing to draw (see Failed runs)."))
        ctx.note(f"{group.title}: no ok run, no figures")
    return blocks


def _render(ctx: ReportContext, view: GroupView, section: Section) -> Rendered:
    """The view's blocks, or, when the group lacks what it needs, a note and its placeholder."""
    reason = view.lacking(ctx, section)
    if reason is None:
        return view.render(ctx, section)
    ctx.note(f"{section.group.title}: no {view.title} ({reason})")
    return Rendered(view.placeholder(section, reason))
