"""Memory vs batch size (one line per method, OOM marked, device capacity drawn) and memory breakdown bars."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Final

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from petlbench.fmt import fmt_bytes
from petlbench.report.frame import Group, variant_order
from petlbench.report.style import (
    LINESTYLES,
    MARKERS,
    OOM_COLOR,
    Label,
    along,
    axis_label,
    choose_scale,
    freeze_layout,
    new_figure,
    padded_limits,
    place_labels,
    set_log_ticks,
    stack_labels,
    style_axis,
)

if TYPE_CHECKING:
    import pandas as pd

CATEGORIES: Final = (
    ("mem_weights_bytes", "weights", "#4c72b0"),
    ("mem_grads_bytes", "gradients", "#dd8452"),
    ("mem_optimizer_bytes", "optimizer state", "#55a868"),
    ("mem_activations_bytes", "activations + temporaries", "#8172b3"),
)


def memory_batch_figure(group: Group, pts: pd.DataFrame, colors: dict[str, str]) -> Figure:
    """Peak allocated memory against batch size; OOM runs as red crosses on the capacity line (or the top)."""
    fig = new_figure(9.0, 5.6)
    ax = fig.subplots()
    ok = pts[(pts["status"] == "ok") & pts["peak_allocated_bytes"].notna()]
    oom = pts[pts["status"] == "oom"]
    capacity = group.capacity
    yscale = choose_scale("bytes", [*ok["peak_allocated_bytes"], *([capacity] if capacity else [])])
    batches = sorted(pts["batch_size"].dropna().unique())
    xlog = len(batches) > 1 and batches[-1] / batches[0] >= 8
    style_axis(ax, "y", yscale)
    if xlog:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(int(b)) for b in batches])
    if xlog:
        ax.minorticks_off()
    ax.grid(True, alpha=0.25)
    ax.set_xlabel("batch size" + (" (log scale)" if xlog else ""))
    ax.set_ylabel(axis_label("peak allocated memory", yscale))

    ys = [yscale(v) for v in ok["peak_allocated_bytes"]]
    cap = yscale(capacity) if capacity else None
    ylim = padded_limits([*ys, *([cap] if cap else [])], yscale.log)
    oom_y = cap
    if len(oom) and cap is None:  # no capacity known: OOM crosses along the top
        ylim = (ylim[0], ylim[1] * 1.4) if yscale.log else (ylim[0], ylim[1] + 0.12 * (ylim[1] - ylim[0]))
        oom_y = ylim[1] / 1.15 if yscale.log else ylim[1] - 0.05 * (ylim[1] - ylim[0])
    ax.set_ylim(*ylim)
    xlim = padded_limits([float(b) for b in batches], xlog, pad=0.06)
    ax.set_xlim(*xlim)
    if cap is not None:
        ax.axhline(cap, color=OOM_COLOR, ls="--", lw=1.0, alpha=0.8)
        ax.text(
            xlim[0], cap, f" device capacity {fmt_bytes(capacity)}", va="bottom", ha="left", fontsize=8, color=OOM_COLOR
        )

    handles: list[Line2D] = []
    ends: list[Label] = []  # lines reaching the largest batch: labelled in a column right of the axes
    inline: list[Label] = []  # lines that stop earlier: labelled next to their last point
    obstacles: list[tuple[float, float]] = []
    seen: dict[str, int] = {}
    for variant in variant_order(pts[pts["status"].isin(["ok", "oom"])]):
        rows = pts[pts["variant"] == variant].sort_values("batch_size")
        tuner = str(rows["method"].iloc[0])
        index = seen.get(tuner, 0)
        seen[tuner] = index + 1
        color = colors[tuner]
        marker, style = MARKERS[index % len(MARKERS)], LINESTYLES[index % len(LINESTYLES)]
        good = rows[(rows["status"] == "ok") & rows["peak_allocated_bytes"].notna()]
        gx = [float(b) for b in good["batch_size"]]
        gy = [yscale(v) for v in good["peak_allocated_bytes"]]
        ax.plot(gx, gy, color=color, ls=style, marker=marker, ms=5, lw=1.5, zorder=3)
        obstacles.extend([*zip(gx, gy, strict=True), *along(gx, gy, xlog, yscale.log)])
        failed = rows[rows["status"] == "oom"]
        fx = [float(b) for b in failed["batch_size"]]
        if fx and oom_y is not None:
            ax.scatter(fx, [oom_y] * len(fx), marker="X", s=70, color=color, edgecolors=OOM_COLOR, zorder=5)
            if gx:
                ax.plot([gx[-1], fx[0]], [gy[-1], oom_y], color=color, ls=":", lw=1.0, alpha=0.7)
        if gx:
            (ends if gx[-1] == batches[-1] else inline).append(Label(gx[-1], gy[-1], variant, color))
        elif fx and oom_y is not None:
            inline.append(Label(fx[0], oom_y, f"{variant} (OOM)", color))
    if len(oom):
        where = "on the capacity line" if cap is not None else "along the top"
        handles.append(
            Line2D([], [], marker="X", ls="", color="#888888", markeredgecolor=OOM_COLOR, ms=8, label=f"OOM ({where})")
        )
    handles.append(Line2D([], [], color="#555555", lw=1.5, label="one line per method (labelled at its last ok batch)"))
    fig.suptitle(f"Peak memory vs batch size\n{group.title}", fontsize=11)
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    set_log_ticks(fig)
    fig.canvas.draw()  # lay out once, to know the axes height the labels are stacked in
    stack_labels(fig, ax, ends, yscale.log)
    freeze_layout(fig)
    place_labels(fig, ax, inline, obstacles)
    return fig


def max_feasible(pts: pd.DataFrame) -> dict[str, str]:
    """Per variant: the largest batch that ran ok, and the smallest that ran out of memory ('64 (oom at 128)')."""
    out: dict[str, str] = {}
    for variant in variant_order(pts):
        rows = pts[pts["variant"] == variant]
        ok = rows.loc[rows["status"] == "ok", "batch_size"]
        oom = rows.loc[rows["status"] == "oom", "batch_size"]
        text = str(int(ok.max())) if len(ok) else "none"
        if len(oom):
            text += f" (oom at {int(oom.min())})"
        out[variant] = text
    return out


def choose_batch(pts: pd.DataFrame, requested: int | None = None) -> int | None:
    """The breakdown's batch: `requested`; else the largest batch every method ran ok; else the most common."""
    ok = pts[(pts["status"] == "ok") & pts["mem_weights_bytes"].notna()]
    if requested is not None:
        return requested if (ok["batch_size"] == requested).any() else None
    if ok.empty:
        return None
    methods = set(ok["variant"])
    everyone = [b for b, rows in ok.groupby("batch_size") if set(rows["variant"]) == methods]
    if everyone:
        return int(max(everyone))
    counts = Counter(int(b) for b in ok["batch_size"])
    return max(counts, key=lambda b: (counts[b], b))


def breakdown_figure(group: Group, pts: pd.DataFrame, batch: int) -> Figure:
    """Stacked horizontal bars: weights / gradients / optimizer / activations per method at one batch size."""
    rows = pts[(pts["batch_size"] == batch) & (pts["status"] == "ok") & pts["mem_weights_bytes"].notna()]
    order = [v for v in variant_order(pts) if v in set(rows["variant"])]
    rows = rows.set_index("variant").loc[order]
    totals = rows[[c for c, _, _ in CATEGORIES]].sum(axis=1)
    scale = choose_scale("bytes", [*totals, *rows["peak_allocated_bytes"].dropna()])
    scale = type(scale)(scale.divisor, scale.unit, False)  # stacked bars stay linear
    fig = new_figure(9.0, 1.3 + 0.42 * len(rows) + 0.8)
    ax = fig.subplots()
    positions = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for column, name, color in CATEGORIES:
        widths = [scale(v) for v in rows[column].fillna(0.0)]
        ax.barh(positions, widths, left=left, color=color, label=name, height=0.62, edgecolor="white", lw=0.5)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    peak_handle = None
    for y, (variant, row), total in zip(positions, rows.iterrows(), left, strict=True):
        ax.text(total, y, f"  {fmt_bytes(totals[variant])}", va="center", ha="left", fontsize=8)
        peak = row["peak_allocated_bytes"]
        if peak == peak and abs(peak - totals[variant]) > 0.005 * peak:  # headline differs from the tracked step
            peak_handle = ax.plot([scale(peak)] * 2, [y - 0.38, y + 0.38], color="black", lw=1.6)[0]
    ax.set_yticks(positions, order)
    ax.set_xlim(0, max(left, default=1.0) * 1.18)
    style_axis(ax, "x", scale)
    ax.set_xlabel(axis_label("memory at the tracked peak", scale))
    if peak_handle is not None:
        peak_handle.set_label("peak allocated (measured steps)")
    fig.suptitle(f"Memory breakdown at batch size {batch}\n{group.title}", fontsize=11)
    fig.legend(loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    return fig
