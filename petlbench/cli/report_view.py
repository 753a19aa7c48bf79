"""`petlbench report`'s rendering: a progress bar while the views are drawn, then what was written where."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from petlbench.cli.console import err, fail, out, progress_bar
from petlbench.errors import PetlbenchError, WriteError
from petlbench.report import Plot
from petlbench.results import check_writable

if TYPE_CHECKING:
    from petlbench.report import ReportSummary

    PlotChoice: TypeAlias = Enum
else:
    PlotChoice = Plot  # an Enum built from the view registry: typer shows and checks `--plot`'s values with it


def show_report(
    paths: Sequence[Path], plots: Sequence[str], out_dir: Path, batch_size: int | None, fmt: str, width: str
) -> None:
    """Build the report with a progress bar (one step per view and group), then print what it wrote."""
    from petlbench.report import build_report

    try:
        check_writable(out_dir, "the report")
        with progress_bar("report") as progress:
            task = progress.add_task("reading results", total=None)

            def step(done: int, total: int, label: str) -> None:
                progress.update(task, completed=done, total=total, description=label)

            summary = build_report(paths, plots, out_dir, batch_size, fmt, width, on_progress=step)
    except OSError as exc:  # the folder was writable a moment ago: full, or removed
        fail(WriteError(f"{out_dir}: cannot write the report ({exc.strerror or exc}); choose another --out"))
    except PetlbenchError as exc:
        fail(exc)
    _summary(summary, fmt)


def _summary(summary: ReportSummary, fmt: str) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in summary.statuses.items())
    out.print(f"{summary.rows} rows ({counts}) in {len(summary.groups)} group(s)")
    if summary.split_by:
        out.print(f"split by {', '.join(summary.split_by)}: no figure mixes groups")
    for note in summary.notes:
        err.print(f"note: {note}")
    kinds = ".pdf + .svg + .png" if fmt == "pdf" else ".png + .svg"
    out.print(f"{len(summary.figures)} figures ({kinds}) → {summary.out}/")
    if summary.vtab_methods:
        out.print(f"VTAB-1k tables: {summary.vtab_methods} methods × 19 tasks, group and flat means (in the report)")
    out.print(f"report: {summary.html}  (also {summary.markdown.name})")
