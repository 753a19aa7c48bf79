"""What fits on my GPU: per method, the largest batch predicted (or measured) to fit in each memory size.

`largest_fitting` is pure (rows in, numbers out); the estimate command prints it as a table and the report of an
estimate folder draws it (`fit_figure`, matplotlib imported only there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

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

    def text(self) -> str:
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


def memory_sizes(rows: pd.DataFrame) -> list[float]:
    """The sizes to judge against: the limits the rows were judged against, plus the common GPU sizes."""
    recorded: list[Any] = list(rows["memory_limit_bytes"].dropna().unique()) if "memory_limit_bytes" in rows else []
    return sorted({float(v) for v in recorded} | {float(s) for s in COMMON_SIZES})


def size_label(size: float) -> str:
    return fmt_bytes(size).replace(".0 ", " ")


def fit_figure(title: str, subtitle: str, table: list[tuple[str, str, list[Fit]]], sizes: Sequence[float]) -> Figure:
    """A grid, one row per method and one column per memory size: the largest batch that fits, written in the
    cell, the cell's shade growing with it (log scale), the method's colour on its name."""
    from matplotlib.patches import Rectangle

    from petlbench.report.style import method_style, new_figure

    fig = new_figure(1.9 + 1.1 * len(sizes), 1.1 + 0.24 * len(table))
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
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set_xticks(range(len(sizes)), [size_label(s) for s in sizes])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(table)), [v for v, _, _ in table])
    for tick, (_, method, _) in zip(ax.get_yticklabels(), table, strict=True):
        tick.set_color(method_style(method).color)
        tick.set_gid(f"method={method}")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("largest batch that fits (+: the largest batch swept fits)", fontsize=8)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    return fig
