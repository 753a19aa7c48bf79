"""What fits on my GPU: per method, the largest batch predicted (or measured) to fit each card or memory size.

Estimate rows of `petlbench estimate --gpu/--device-memory` (and of a `batch_size: auto` suite) carry the searched
answer (`fits_json`: per card, the largest batch that fits and the smallest that does not, found on the replay
rather than read off the sweep), and the report shows exactly those cards. Other rows (measured sweeps, older
estimates) fall back to the sweep: the largest batch of the sweep whose peak is within each size (`largest_fitting`).
The functions here are pure; `fit_figure` imports matplotlib.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from petlbench.columns import FitSearch
from petlbench.fmt import fmt_bytes

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

GiB: Final = 1024**3
COMMON_SIZES: Final = (24 * GiB, 48 * GiB, 80 * GiB)  # common GPU memory sizes when the rows name none


@dataclass(frozen=True)
class Fit:
    """The largest swept batch whose peak is at most `memory`; `all_fit` when even the largest swept batch fits
    (larger ones were not tried, so the true maximum may be higher)."""

    batch: int | None
    all_fit: bool
    searched: bool = True  # False: this size or card was not searched for this method ("-")

    def text(self) -> str:
        if not self.searched:
            return "-"
        if self.batch is None:
            return "none"
        return f"{self.batch}+" if self.all_fit else str(self.batch)


def largest_fitting(peaks: Sequence[tuple[int, float | None]], memory: float) -> Fit:
    """`peaks`: (batch size, peak bytes; None = did not finish, e.g. OOM). Batches above the first one that does
    not fit are not counted even if their peak were lower (a sweep is read in order)."""
    best: int | None = None
    ordered = sorted(peaks)
    for batch, peak in ordered:
        if peak is None or (isinstance(peak, float) and math.isnan(peak)) or peak > memory:
            return Fit(best, False)
        best = batch
    return Fit(best, best is not None)


def fit_rows(pts: pd.DataFrame, sizes: Sequence[float], variants: Sequence[str]) -> list[tuple[str, str, list[Fit]]]:
    """(variant, method, one Fit per size) in `variants` order."""
    out: list[tuple[str, str, list[Fit]]] = []
    for variant in variants:
        rows = pts[pts["variant"] == variant]
        peaks: list[tuple[int, float | None]] = [
            (int(r["batch_size"]), float(r["peak_allocated_bytes"]) if r["status"] == "ok" else None)
            for _, r in rows.iterrows()
        ]
        out.append((variant, str(rows["method"].iloc[0]), [largest_fitting(peaks, size) for size in sizes]))
    return out


def fit_cell(fit: FitSearch | None, cuda: bool = True) -> str:
    """A searched answer as a table cell: `2464 (77.1 GiB)` = batch and predicted reserved memory there (CUDA; the
    peak for CPU); `65536+` when the search's upper bound fits; `none`; `-` when not searched."""
    if fit is None:
        return "-"
    if fit.max_batch is None:
        return "none"
    text = f"{fit.max_batch}{'+' if fit.first_over is None else ''}"
    at = fit.reserved_bytes if cuda and fit.reserved_bytes is not None else fit.allocated_bytes
    return f"{text} ({fmt_bytes(at)})" if at is not None else text


def as_fit(fit: FitSearch | None) -> Fit:
    """A searched answer as a grid cell of `fit_figure`."""
    if fit is None:
        return Fit(None, False, searched=False)
    return Fit(fit.max_batch, fit.max_batch is not None and fit.first_over is None)


def searched_fits(pts: pd.DataFrame, variants: Sequence[str]) -> tuple[list[str], dict[str, dict[str, FitSearch]]]:
    """The cards searched (in the order first seen) and, per variant, its answer for each; ([], {}) when no row
    carries a searched answer."""
    if "fits_json" not in pts:
        return [], {}
    labels: list[str] = []
    found: dict[str, dict[str, FitSearch]] = {}
    for variant in variants:
        rows = pts[(pts["variant"] == variant) & pts["fits_json"].notna()]
        if rows.empty:
            continue
        fits = [FitSearch.model_validate(f) for f in json.loads(str(rows["fits_json"].iloc[0]))]
        found[variant] = {f.gpu: f for f in fits}
        labels += [f.gpu for f in fits if f.gpu not in labels]
    return labels, found


def memory_sizes(rows: pd.DataFrame) -> list[float]:
    """The sizes to judge against: the limits the rows were judged against, plus the common GPU sizes."""
    recorded: list[Any] = list(rows["memory_limit_bytes"].dropna().unique()) if "memory_limit_bytes" in rows else []
    return sorted({float(v) for v in recorded} | {float(s) for s in COMMON_SIZES})


def size_label(size: float) -> str:
    return fmt_bytes(size).replace(".0 ", " ")


def fit_figure(
    title: str, subtitle: str, table: list[tuple[str, str, list[Fit]]], columns: Sequence[str], note: str
) -> Figure:
    """A grid, one row per method and one column per card or memory size: the largest batch that fits, written in
    the cell, the cell's shade growing with it (log scale), the method's colour on its name. Titles and the note
    wrap to the figure's width; long column names are tilted so neighbours never overprint."""
    from matplotlib.patches import Rectangle

    from petlbench.report.style import method_style, new_figure

    width = max(4.8, 2.2 + 1.2 * len(columns))
    chars = int(width * 11)  # characters per line at the title's size
    tilt = max((len(c) for c in columns), default=0) * 0.075 > 1.1  # a label wider than its column
    fig = new_figure(width, 1.6 + 0.24 * len(table) + (0.4 if tilt else 0.0))
    ax = fig.subplots()
    batches = [[math.log2(f.batch) if f.batch else 0.0 for f in fits] for _, _, fits in table]
    top = max((b for row in batches for b in row), default=1.0) or 1.0
    for r, ((variant, _method, fits), logs) in enumerate(zip(table, batches, strict=True)):
        for c, (fit, value) in enumerate(zip(fits, logs, strict=True)):
            shade = 0.92 - 0.6 * value / top
            cell = Rectangle((c - 0.5, r - 0.5), 1, 1, color=(shade, shade + 0.04, 1.0), gid=f"fit={variant}")
            ax.add_patch(cell)
            ax.text(
                c, r, fit.text(), ha="center", va="center", fontsize=7.5, color="black" if shade > 0.55 else "white"
            )
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set_xticks(range(len(columns)), list(columns), rotation=30 if tilt else 0, ha="left" if tilt else "center")
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(table)), [v for v, _, _ in table])
    for tick, (_, method, _) in zip(ax.get_yticklabels(), table, strict=True):
        tick.set_color(method_style(method).color)
        tick.set_gid(f"method={method}")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("\n".join(textwrap.wrap(note, int(width * 9))), fontsize=8)  # centred under the grid only
    fig.suptitle("\n".join([*textwrap.wrap(title, chars), *textwrap.wrap(subtitle, chars)]), fontsize=10)
    return fig
