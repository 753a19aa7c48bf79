"""Shared figure plumbing: headless figures, colours per tuner, human-unit axes, labels that avoid each other.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no global backend
switch, no state shared between figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import Bbox, offset_copy

from petlbench.report.identity import MethodStyle, method_sort_key, method_style

__all__ = ["MethodStyle", "method_sort_key", "method_style"]

UnitKind: TypeAlias = Literal["bytes", "count", "rate", "pct"]

OOM_COLOR: Final = "#d62728"  # red means OOM / capacity in every figure: no method is red
LINESTYLES: Final = ("-", "--", "-.", ":")
LOG_SPAN: Final = 20.0  # a positive axis spanning more than this factor goes log


def method_handle(method: str, label: str | None = None, **line: Any) -> Line2D:
    """A legend entry in the method's colour and marker."""
    style = method_style(method)
    return Line2D(
        [],
        [],
        marker=style.marker,
        ls="",
        color=style.color,
        markeredgecolor="black",
        markersize=7,
        label=label or method,
        **line,
    )


def tuner_colors(tuners: Iterable[str]) -> dict[str, str]:
    """A colour per method, from `method_style`: the same in every figure and every report."""
    return {name: method_style(name).color for name in set(tuners)}


@dataclass(frozen=True)
class PaperFormat:
    """Figures for a paper: a fixed width (3.3 in one column, 7 in two columns), no grid, no top/right spines."""

    width_in: float = 7.0


PAPER_RC: Final[dict[Any, Any]] = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "font.size": 8.0}
_PAPER: ContextVar[PaperFormat | None] = ContextVar("petlbench_paper", default=None)


@contextmanager
def paper_format(paper: PaperFormat | None) -> Iterator[None]:
    """Within this block new figures are sized for a paper column (None: the screen sizes)."""
    token = _PAPER.set(paper)
    try:
        rc: dict[Any, Any] = PAPER_RC if paper else {}
        with rc_context(rc):
            yield
    finally:
        _PAPER.reset(token)


def paper_active() -> bool:
    return _PAPER.get() is not None


def new_figure(width: float, height: float) -> Figure:
    """A headless figure; in paper format scaled to the column width (height kept in proportion, not below 2 in)."""
    paper = _PAPER.get()
    if paper is not None:
        height = max(2.0, height * paper.width_in / width)
        width = paper.width_in
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def spread_offsets(
    ax: Axes, xs: Sequence[float], ys: Sequence[float], radius_px: float = 5.0, step_pt: float = 4.0
) -> list[float]:
    """Horizontal offsets (points) that fan out markers drawn on top of each other, so none hides another
    (e.g. LoRA r=4 and r=8 at the same memory). Call once the limits are set; untouched points get 0."""
    screen: list[Any] = list(ax.transData.transform(list(zip(xs, ys, strict=True)))) if xs else []
    offsets = [0.0] * len(xs)
    clusters: list[list[int]] = []
    for i, point in enumerate(screen):
        for cluster in clusters:
            anchor = screen[cluster[0]]
            if abs(point[0] - anchor[0]) < radius_px and abs(point[1] - anchor[1]) < radius_px:
                cluster.append(i)
                break
        else:
            clusters.append([i])
    for cluster in clusters:
        for k, i in enumerate(cluster):
            offsets[i] = (k - (len(cluster) - 1) / 2) * step_pt
    return offsets


def nudged(fig: Figure, ax: Axes, dx_pt: float) -> Any:
    """The data transform shifted by `dx_pt` points (the marker moves; its data value does not)."""
    return offset_copy(ax.transData, fig=fig, x=dx_pt, y=0.0, units="points") if dx_pt else ax.transData


@dataclass(frozen=True)
class Scale:
    """How an axis shows one metric: divisor, unit text, log or linear."""

    divisor: float
    unit: str
    log: bool

    def __call__(self, value: float) -> float:
        return value / self.divisor


def choose_scale(kind: UnitKind, values: Iterable[float]) -> Scale:
    """Unit from the largest value (bytes → KiB/MiB/GiB, counts → k/M), log when the values span decades."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max((abs(v) for v in finite), default=1.0)
    positive = [v for v in finite if v > 0]
    log = len(positive) == len(finite) and len(positive) > 1 and max(positive) / min(positive) > LOG_SPAN
    if kind == "bytes":
        for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
            if top >= 1024**power:
                return Scale(1024.0**power, unit, log)
        return Scale(1.0, "B", log)
    if kind == "count":
        if top >= 1e6:
            return Scale(1e6, "M", log)
        if top >= 1e4:
            return Scale(1e3, "k", log)
        return Scale(1.0, "", log)
    if kind == "pct":
        return Scale(0.01, "%", False)
    return Scale(1.0, "", log)


def axis_label(name: str, scale: Scale, unit_word: str = "") -> str:
    """'peak allocated memory (MiB)', 'trainable parameters (M)', 'top-1 accuracy (%)'."""
    unit = scale.unit or unit_word
    return f"{name} ({unit}, log scale)" if scale.log and unit else f"{name} ({unit})" if unit else name


def style_axis(ax: Axes, which: Literal["x", "y"], scale: Scale) -> None:
    """Log scale with plain-number ticks (1, 2, 5, 10, ...) when the scale says so."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    if scale.log:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick(v)))
    if _PAPER.get() is not None:  # print: no grid, no box
        ax.spines[["top", "right"]].set_visible(False)
    else:
        ax.grid(True, which="major", alpha=0.25)


def _tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def padded_limits(values: Sequence[float], log: bool, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits around `values` with a margin (multiplicative on log axes)."""
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return (0.1, 1.0) if log else (0.0, 1.0)
    low, high = min(finite), max(finite)
    if log:
        factor = (high / low) ** pad if high > low else 1.5
        factor = max(factor, 1.15)
        return low / factor, high * factor
    span = high - low or abs(high) or 1.0
    return low - span * pad, high + span * pad


@dataclass
class Label:
    """A text to place next to a data point (in data coordinates)."""

    x: float
    y: float
    text: str
    color: str
    priority: bool = True  # frontier labels must be placed; others only where they fit
    size: float = 8.0


# candidate offsets in points: (dx, dy, horizontal alignment, vertical alignment)
_OFFSETS: Final = (
    (7, 5, "left", "bottom"),
    (7, -5, "left", "top"),
    (-7, 5, "right", "bottom"),
    (-7, -5, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (14, 16, "left", "bottom"),
    (14, -16, "left", "top"),
    (-14, 16, "right", "bottom"),
    (-14, -16, "right", "top"),
    (0, 24, "center", "bottom"),
    (0, -24, "center", "top"),
    (24, 30, "left", "bottom"),
    (24, -30, "left", "top"),
    (-24, 30, "right", "bottom"),
    (-24, -30, "right", "top"),
    (0, 40, "center", "bottom"),
    (0, -40, "center", "top"),
)


def place_labels(fig: Figure, ax: Axes, labels: Sequence[Label], obstacles: Sequence[tuple[float, float]]) -> None:
    """Annotate each label at the first candidate offset that overlaps no other label, point or the axes edge.

    Priority labels take the least-overlapping offset when none is free (with a leader line when far);
    the others are dropped rather than drawn over something. Call after limits and layout are final.
    """
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = ax.get_window_extent(renderer)
    taken: list[Bbox] = []
    for ox, oy in obstacles:
        px, py = ax.transData.transform((ox, oy))
        taken.append(Bbox.from_extents(px - 4, py - 4, px + 4, py + 4))
    ordered = sorted(labels, key=lambda lab: (not lab.priority, lab.x, lab.y))
    for label in ordered:
        best: tuple[float, Any, Bbox] | None = None
        for dx, dy, ha, va in _OFFSETS:
            text = ax.annotate(
                label.text,
                (label.x, label.y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=label.size,
                color=label.color,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
                zorder=6,
            )
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in taken) + 4 * _outside(box, frame)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        assert best is not None
        cost, text, box = best
        if cost > 0 and not label.priority:
            text.remove()
            continue
        if abs(text.xyann[0]) + abs(text.xyann[1]) > 14:  # far from its point: draw a leader line
            ax.annotate(
                "",
                (label.x, label.y),
                xytext=text.xyann,
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "color": label.color, "lw": 0.6, "alpha": 0.7},
                zorder=5,
            )
        taken.append(box)


def _overlap(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    return box.width * box.height - _overlap(box, frame)


def freeze_layout(fig: Figure) -> None:
    """Pick log ticks for the final limits, run the constrained layout once, then fix it, so label positions
    measured now stay true when saved."""
    set_log_ticks(fig)
    fig.canvas.draw()
    fig.set_layout_engine("none")


def set_log_ticks(fig: Figure) -> None:
    """Log-axis ticks for the final limits: 1..9 within a decade, 1-2-5 over a few, powers of ten beyond."""
    for ax in fig.axes:
        for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            fixed = not isinstance(axis.get_major_locator(), LogLocator)  # e.g. batch sizes as ticks
            if axis.get_scale() == "log" and not fixed and low > 0 and high > low:
                decades = math.log10(high / low)
                subs = tuple(range(1, 10)) if decades < 1.2 else (1, 2, 5) if decades < 2.5 else (1,)
                axis.set_major_locator(LogLocator(base=10, subs=[float(s) for s in subs]))


def stack_labels(fig: Figure, ax: Axes, ends: Sequence[Label], ylog: bool) -> None:
    """Direct labels for line ends: a column just right of the axes, in the same vertical order as the ends,
    spread apart so none overlap, each tied to its end by a thin leader line."""
    if not ends:
        return
    low, high = ax.get_ylim()

    def fraction(y: float) -> float:
        if ylog:
            return (math.log(y) - math.log(low)) / (math.log(high) - math.log(low))
        return (y - low) / (high - low)

    height_pt = ax.get_position().height * fig.get_figheight() * 72
    gap = min(1.4 * max(e.size for e in ends) / height_pt, 1.0 / len(ends))
    order = sorted(range(len(ends)), key=lambda i: fraction(ends[i].y))
    spots = [min(max(fraction(ends[i].y), 0.0), 1.0) for i in order]
    for k in range(1, len(spots)):  # push up to keep the gap
        spots[k] = max(spots[k], spots[k - 1] + gap)
    if spots[-1] > 1.0:  # then pull down from the top
        spots[-1] = 1.0
        for k in range(len(spots) - 2, -1, -1):
            spots[k] = min(spots[k], spots[k + 1] - gap)
    for i, spot in zip(order, spots, strict=True):
        end = ends[i]
        ax.annotate(
            end.text,
            (end.x, end.y),
            xytext=(1.02, spot),
            textcoords="axes fraction",
            ha="left",
            va="center",
            fontsize=end.size,
            color=end.color,
            arrowprops={"arrowstyle": "-", "color": end.color, "lw": 0.6, "alpha": 0.6, "shrinkA": 1, "shrinkB": 3},
        )


def along(
    xs: Sequence[float], ys: Sequence[float], xlog: bool, ylog: bool, steps: int = 12
) -> list[tuple[float, float]]:
    """Points along a polyline (straight on the axes' scales), so labels avoid lines as well as markers."""
    out: list[tuple[float, float]] = []
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=False), strict=False):
        for i in range(1, steps):
            t = i / steps
            x = x0 * (x1 / x0) ** t if xlog and x0 > 0 and x1 > 0 else x0 + (x1 - x0) * t
            y = y0 * (y1 / y0) ** t if ylog and y0 > 0 and y1 > 0 else y0 + (y1 - y0) * t
            out.append((x, y))
    return out
