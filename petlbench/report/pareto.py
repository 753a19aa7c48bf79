"""Pareto fronts: the pure frontier computation and the figures drawn from it.

A point is on the front when no other point is at least as good on both axes and strictly better on one.
Each figure shows one group (see `frame.split_groups`), one panel per batch size: front points joined and
labelled `tuner knob`, dominated points faint, OOM runs as red-edged crosses at the device capacity (or the
axis edge when the capacity is unknown) and at the bottom of an axis they have no value on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from petlbench.fmt import fmt_bytes
from petlbench.report.frame import Group
from petlbench.report.rows import knob_text
from petlbench.report.style import (
    OOM_COLOR,
    Label,
    Scale,
    UnitKind,
    along,
    axis_label,
    choose_scale,
    freeze_layout,
    method_handle,
    method_sort_key,
    method_style,
    new_figure,
    nudged,
    padded_limits,
    place_labels,
    spread_offsets,
    style_axis,
)

if TYPE_CHECKING:
    import pandas as pd
    from numpy.typing import ArrayLike, NDArray


def frontier_mask(
    x: ArrayLike, y: ArrayLike, *, maximize_x: bool = False, maximize_y: bool = True
) -> NDArray[np.bool_]:
    """Which points are non-dominated. NaN on either axis is never on the front; exact ties are all kept.

    Args:
        x, y: coordinates, same length.
        maximize_x, maximize_y: the direction that is better on each axis (default: less x, more y).

    Returns:
        A boolean array, True for points on the Pareto front.
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D and the same length, got {xs.shape} and {ys.shape}")
    # flip to 'smaller is better' on both axes
    gx = -xs if maximize_x else xs
    gy = -ys if maximize_y else ys
    valid = ~(np.isnan(gx) | np.isnan(gy))
    front = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        no_worse = (gx[others] <= gx[i]) & (gy[others] <= gy[i])
        better = (gx[others] < gx[i]) | (gy[others] < gy[i])
        if np.any(no_worse & better):
            front[i] = False
    result: NDArray[np.bool_] = front
    return result


@dataclass(frozen=True)
class Axis:
    """A metric on a Pareto axis."""

    column: str
    name: str
    kind: UnitKind
    maximize: bool
    unit_word: str = ""


MEMORY: Final = Axis("peak_allocated_bytes", "peak allocated memory", "bytes", False)
PARAMS: Final = Axis("params_trainable", "trainable parameters", "count", False)
THROUGHPUT: Final = Axis("train_images_per_s", "training throughput", "rate", True, "images/s")
ACCURACY: Final = Axis("acc_top1", "top-1 accuracy", "pct", True)


@dataclass(frozen=True)
class ParetoSpec:
    """One Pareto figure: y against x."""

    name: str  # file-name part
    title: str
    x: Axis
    y: Axis
    front: bool = True  # False: a plain scatter, every point labelled (a front that one point dominates says little)


WITH_ACCURACY: Final = (
    ParetoSpec("acc-vs-memory", "Accuracy vs peak memory", MEMORY, ACCURACY),
    ParetoSpec("acc-vs-params", "Accuracy vs trainable parameters", PARAMS, ACCURACY),
    ParetoSpec("throughput-vs-memory", "Training throughput vs peak memory", MEMORY, THROUGHPUT),
)
WITHOUT_ACCURACY: Final = (
    ParetoSpec("throughput-vs-memory", "Training throughput vs peak memory", MEMORY, THROUGHPUT),
    ParetoSpec("params-vs-memory", "Trainable parameters vs peak memory", MEMORY, PARAMS, front=False),
)


def pareto_specs(pts: pd.DataFrame) -> tuple[ParetoSpec, ...]:
    """The accuracy fronts when any point has an accuracy, else the memory/throughput/params ones; a view whose
    axes no ok point has values on (throughput of an estimate) is left out rather than drawn empty."""
    has_accuracy = bool(pts["acc_top1"].notna().any())
    ok = pts[pts["status"] == "ok"]
    specs = WITH_ACCURACY if has_accuracy else WITHOUT_ACCURACY
    return tuple(s for s in specs if ok[[s.x.column, s.y.column]].notna().all(axis=1).any())


def frontier_flags(pts: pd.DataFrame, spec: ParetoSpec) -> pd.Series:
    """Per point: on this spec's front within its batch size (ok points only)."""
    import pandas as pd

    flags = pd.Series(False, index=pts.index)
    usable = pts["status"] == "ok"
    if THROUGHPUT in (spec.x, spec.y) and "timing_unstable" in pts:
        usable &= ~pts["timing_unstable"].astype(bool)  # a throughput front is never built on unstable timings
    panels = pts[usable].groupby("batch_size") if spec.front else []
    for _, panel in panels:
        mask = frontier_mask(
            panel[spec.x.column], panel[spec.y.column], maximize_x=spec.x.maximize, maximize_y=spec.y.maximize
        )
        flags.loc[panel.index] = mask
    result: pd.Series = flags
    return result


def pareto_figure(group: Group, pts: pd.DataFrame, spec: ParetoSpec, flags: pd.Series) -> Figure:
    """One figure, one panel per batch size."""
    drawable = pts[(pts["status"] == "oom") | pts[[spec.x.column, spec.y.column]].notna().all(axis=1)]
    batches = sorted(drawable["batch_size"].dropna().unique())  # no empty panel
    ncols = min(len(batches), 3) or 1
    nrows = max(1, math.ceil(len(batches) / ncols))
    fig = new_figure(max(5.2 * ncols, 8.0), 4.2 * nrows + 1.1)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    ok = pts[pts["status"] == "ok"]
    xscale = choose_scale(spec.x.kind, ok[spec.x.column].dropna())
    yscale = choose_scale(spec.y.kind, ok[spec.y.column].dropna())
    capacity = group.capacity
    drawers = []
    for ax, batch in zip(axes, batches, strict=False):
        panel = pts[pts["batch_size"] == batch]
        drawers.append(_panel(fig, ax, panel, flags.loc[panel.index], spec, xscale, yscale, capacity, group))
        ax.set_title(f"batch size {int(batch)}   (better: {_better(spec)})", fontsize=10)
    for ax in axes[len(batches) :]:
        ax.remove()  # no empty panel
    fig.suptitle(f"{group.headline(spec.title)}\n{group.title}", fontsize=11)
    shows_limit = spec.x.kind == "bytes" and (group.predicted or (pts["status"] == "oom").any())
    handles = _legend(pts, spec, capacity if shows_limit else None, group.capacity_name)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    freeze_layout(fig)
    for ax, (labels, obstacles) in zip(axes, drawers, strict=False):
        place_labels(fig, ax, labels, obstacles)
    return fig


def _panel(
    fig: Figure,
    ax: Axes,
    panel: pd.DataFrame,
    front: pd.Series,
    spec: ParetoSpec,
    xscale: Scale,
    yscale: Scale,
    capacity: float | None,
    group: Group,
) -> tuple[list[Label], list[tuple[float, float]]]:
    style_axis(ax, "x", xscale)
    style_axis(ax, "y", yscale)
    predicted = "predicted " if group.predicted else ""
    ax.set_xlabel(axis_label(predicted * (spec.x.kind == "bytes") + spec.x.name, xscale, spec.x.unit_word))
    ax.set_ylabel(axis_label(spec.y.name, yscale, spec.y.unit_word))
    ok = panel[panel["status"] == "ok"]
    drawn = ok.dropna(subset=[spec.x.column, spec.y.column])
    oom = panel[panel["status"] == "oom"]
    xs = [xscale(v) for v in drawn[spec.x.column]]
    ys = [yscale(v) for v in drawn[spec.y.column]]
    cap = xscale(capacity) if capacity and spec.x.kind == "bytes" else None
    oom_xs = [_value(p, spec.x, xscale) for _, p in oom.iterrows()]
    known_oom_x = [v for v in oom_xs if v is not None]
    show_cap = cap is not None and (len(oom) > 0 or group.predicted)
    xlim = padded_limits([*xs, *known_oom_x, *([cap] if show_cap and cap is not None else [])], xscale.log)
    ylim = padded_limits(ys, yscale.log)
    fallback_x = cap
    if any(v is None for v in oom_xs) and fallback_x is None:  # capacity unknown: an OOM zone past the points
        zone = xlim[1]
        xlim = (xlim[0], xlim[1] * 1.5) if xscale.log else (xlim[0], xlim[1] + 0.25 * (xlim[1] - xlim[0]))
        fallback_x = math.sqrt(zone * xlim[1]) if xscale.log else (zone + xlim[1]) / 2
        ax.axvspan(zone, xlim[1], color=OOM_COLOR, alpha=0.07, lw=0)
        ax.text(
            fallback_x,
            0.97,
            "OOM",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=7.5,
            color=OOM_COLOR,
        )
    if len(oom):  # room at the bottom for OOM crosses without a y value
        ylim = (ylim[0] / 1.5, ylim[1]) if yscale.log else (ylim[0] - 0.08 * (ylim[1] - ylim[0]), ylim[1])
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    if cap is not None and show_cap and xlim[0] < cap < xlim[1]:
        ax.axvline(cap, color=OOM_COLOR, lw=1.0, ls="--", alpha=0.7)
    bottom = ylim[0] * 1.15 if yscale.log else ylim[0] + 0.04 * (ylim[1] - ylim[0])

    labels: list[Label] = []
    obstacles: list[tuple[float, float]] = []
    on_front = drawn[front.loc[drawn.index]]
    off_front = drawn[~front.loc[drawn.index]]
    fan = spread_offsets(ax, xs, ys)  # markers on top of each other fan out sideways
    shift = {index: fan[i] for i, index in enumerate(drawn.index)}
    timed = THROUGHPUT in (spec.x, spec.y)
    for index, p in off_front.iterrows():
        x, y = xscale(p[spec.x.column]), yscale(p[spec.y.column])
        style = method_style(str(p["method"]))
        faint = spec.front  # without a front every point is a first-class point
        unstable = timed and bool(p.get("timing_unstable", False))  # hollow grey: its speed is not to be trusted
        ax.scatter(
            [x],
            [y],
            s=28 if faint else 50,
            color="none" if unstable else style.color,
            marker=style.marker,
            alpha=0.9 if unstable else 0.3 if faint else 0.95,
            edgecolors="#999999" if unstable else "none" if faint else "black",
            linewidths=1.0 if unstable else 0.5,
            zorder=3,
            transform=nudged(fig, ax, shift[index]),
            gid=f"method={p['method']}",
        )
        obstacles.append((x, y))
        text = f"{p['variant']} (unstable timing)" if unstable else str(p["variant"])
        labels.append(Label(x, y, text, "#777777" if faint else style.color, priority=not faint, size=7))
    if len(on_front):
        ordered = on_front.sort_values(spec.x.column)
        fx = [xscale(v) for v in ordered[spec.x.column]]
        fy = [yscale(v) for v in ordered[spec.y.column]]
        ax.plot(fx, fy, color="#333333", lw=1.2, alpha=0.8, zorder=2)
        obstacles.extend(along(fx, fy, xscale.log, yscale.log))
        for (index, p), x, y in zip(ordered.iterrows(), fx, fy, strict=True):
            style = method_style(str(p["method"]))
            ax.scatter(
                [x],
                [y],
                s=60,
                color=style.color,
                marker=style.marker,
                edgecolors="black",
                linewidths=0.7,
                zorder=4,
                transform=nudged(fig, ax, shift[index]),
                gid=f"method={p['method']}",
            )
            obstacles.append((x, y))
        labels.extend(_front_labels(ax, ordered, fx, fy))
    # OOM: a red-edged cross per run; those that share a spot get one label
    spots: dict[tuple[float, float], list[str]] = {}
    for (_, p), known_x in zip(oom.iterrows(), oom_xs, strict=True):
        ox = known_x if known_x is not None else fallback_x
        oy = _value(p, spec.y, yscale)
        if ox is None:
            continue
        spot = (ox, oy if oy is not None else bottom)
        ax.scatter(
            [spot[0]],
            [spot[1]],
            marker="X",
            s=80,
            color=method_style(str(p["method"])).color,
            edgecolors=OOM_COLOR,
            zorder=5,
        )
        obstacles.append(spot)
        spots.setdefault(spot, []).append(str(p["variant"]))
    for (x, y), names in spots.items():
        labels.append(Label(x, y, "OOM: " + ", ".join(names), OOM_COLOR, priority=True, size=7.5))
    hidden = len(ok) - len(drawn)
    if hidden:
        ax.text(
            0.99,
            0.01,
            f"{hidden} ok run(s) without {spec.y.name if ok[spec.y.column].isna().any() else spec.x.name}: not drawn",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="#777777",
        )
    return labels, obstacles


def _front_labels(ax: Axes, ordered: pd.DataFrame, fx: list[float], fy: list[float]) -> list[Label]:
    """One label per front point, except that neighbouring points of one tuner that sit close together share
    one label ('sqt num_queries=8, 16, 32', in front order) instead of stacking three."""
    screen = ax.transData.transform(list(zip(fx, fy, strict=True)))
    tuners = [str(t) for t in ordered["method"]]
    runs: list[list[int]] = []
    for i in range(len(tuners)):
        if runs and tuners[runs[-1][-1]] == tuners[i] and math.dist(screen[i], screen[runs[-1][-1]]) < 40:
            runs[-1].append(i)
        else:
            runs.append([i])
    labels = []
    for run in runs:
        first = ordered.iloc[run[0]]
        if len(run) == 1:
            text = str(first["variant"])
        else:
            values = [knob_text(first["knob_name"], ordered.iloc[i]["knob"]).partition("=")[2] for i in run]
            text = f"{first['method']} {first['knob_name']}={', '.join(values)}"
        middle = run[len(run) // 2]
        labels.append(Label(fx[middle], fy[middle], text, method_style(tuners[middle]).color, priority=True, size=8.5))
    return labels


def _better(spec: ParetoSpec) -> str:
    """The arrow to the better corner: ↖ for less x and more y."""
    arrows = {(False, True): "↖", (True, True): "↗", (False, False): "↙", (True, False): "↘"}
    return arrows[(spec.x.maximize, spec.y.maximize)]


def _value(p: pd.Series, axis: Axis, scale: Scale) -> float | None:
    value = p[axis.column]
    if axis.kind == "bytes" or value is None or math.isnan(float(value)):
        return None  # an OOM run has no valid peak: it is drawn at the capacity
    return scale(float(value))


def _legend(pts: pd.DataFrame, spec: ParetoSpec, capacity: float | None, capacity_name: str) -> list[Line2D]:
    methods = pts.loc[pts["status"].isin(["ok", "oom"]), "method"].dropna().unique()
    handles = [method_handle(str(t)) for t in sorted(methods, key=lambda m: method_sort_key(str(m)))]
    if spec.front:
        handles.append(Line2D([], [], color="#333333", lw=1.2, label="Pareto front (labelled)"))
        handles.append(Line2D([], [], marker="o", ls="", color="#888888", alpha=0.3, label="dominated (faint)"))
    if (pts["status"] == "oom").any():
        where = "drawn at the capacity line" if capacity else "no value: drawn at the edge"
        handles.append(
            Line2D(
                [],
                [],
                marker="X",
                ls="",
                color="#888888",
                markeredgecolor=OOM_COLOR,
                markersize=8,
                label=f"OOM ({where})",
            )
        )
    if capacity:
        handles.append(Line2D([], [], color=OOM_COLOR, ls="--", label=f"{capacity_name} {fmt_bytes(capacity)}"))
    return handles


def front_sequences(pts: pd.DataFrame, spec: ParetoSpec, flags: pd.Series) -> list[tuple[int, list[str]]]:
    """(batch size, front variants in x order) per panel: the frontier list of the report."""
    out: list[tuple[int, list[str]]] = []
    for batch, panel in pts[flags].groupby("batch_size", sort=True):
        ordered = panel.sort_values(spec.x.column, ascending=not spec.x.maximize)
        out.append((int(batch), [str(v) for v in ordered["variant"]]))
    return out


def describe_axes(spec: ParetoSpec) -> str:
    """'max top-1 accuracy, min peak allocated memory'."""
    parts: Sequence[str] = [
        f"{'max' if spec.y.maximize else 'min'} {spec.y.name}",
        f"{'max' if spec.x.maximize else 'min'} {spec.x.name}",
    ]
    return ", ".join(parts)
