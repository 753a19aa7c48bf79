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
    """Grouped horizontal bars: per method, one bar per memory size, its length the largest batch that fits."""
    from petlbench.report.style import method_style, new_figure

    fig = new_figure(9.0, 1.4 + 0.22 * len(table) * len(sizes) + 0.6)
    ax = fig.subplots()
    height = 0.8 / max(len(sizes), 1)
    largest = max((f.batch or 0 for _, _, fits in table for f in fits), default=1) or 1
    for row, (variant, method, fits) in enumerate(reversed(table)):
        color = method_style(method).color
        for k, (size, fit) in enumerate(zip(sizes, fits, strict=True)):
            y = row + (len(sizes) - 1 - k - (len(sizes) - 1) / 2) * height
            alpha = 0.35 + 0.65 * (k + 1) / len(sizes)  # larger memory: darker shade of the method's colour
            ax.barh(
                y, fit.batch or 0, height=height * 0.9, color=color, alpha=alpha, edgecolor="none", gid=f"fit={variant}"
            )
            label = f" {fit.text()} @ {size_label(size)}"
            ax.text(fit.batch or 0, y, label, va="center", ha="left", fontsize=6.5, color="#333333")
    ax.set_yticks(range(len(table)), [v for v, _, _ in reversed(table)])
    ax.set_xlim(0, largest * 1.35)
    ax.set_xlabel("largest batch size that fits (+: the largest batch swept fits)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    return fig
