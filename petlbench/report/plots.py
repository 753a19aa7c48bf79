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
    OOM_COLOR,
    Label,
    along,
    axis_label,
    choose_scale,
    freeze_layout,
    method_style,
    new_figure,
    padded_limits,
    paper_active,
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


PANEL_LINES: Final = 8  # more lines than this: one panel per method family (small multiples)


def memory_batch_figure(group: Group, pts: pd.DataFrame) -> Figure:
    """Peak allocated memory against batch size; OOM runs as red crosses on the capacity line (or the top).

    Up to PANEL_LINES lines share one panel, labelled at their ends; more are split into one panel per method
    family (shared axes, a legend per panel), so no panel bundles lines no one can tell apart.
    """
    drawn = pts[pts["status"].isin(["ok", "oom"])]
    variants = variant_order(drawn)
    families: dict[str, list[str]] = {}
    for variant in variants:
        method = str(drawn.loc[drawn["variant"] == variant, "method"].iloc[0])
        families.setdefault(method_style(method).family if len(variants) > PANEL_LINES else "", []).append(variant)
    panels = list(families.items())
    ncols = min(len(panels), 2 if paper_active() else 3)
    nrows = -(-len(panels) // ncols)
    fig = new_figure(9.0 if ncols == 1 else 4.6 * ncols, 5.6 if nrows == 1 else 3.9 * nrows + 1.0)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    ok = pts[(pts["status"] == "ok") & pts["peak_allocated_bytes"].notna()]
    oom = pts[pts["status"] == "oom"]
    capacity = group.capacity
    yscale = choose_scale("bytes", [*ok["peak_allocated_bytes"], *([capacity] if capacity else [])])
    batches = sorted(pts["batch_size"].dropna().unique())
    xlog = len(batches) > 1 and batches[-1] / batches[0] >= 8
    ys = [yscale(v) for v in ok["peak_allocated_bytes"]]
    cap = yscale(capacity) if capacity else None
    ylim = padded_limits([*ys, *([cap] if cap else [])], yscale.log)
    oom_y = cap
    if len(oom) and cap is None:  # no capacity known: OOM crosses along the top
        ylim = (ylim[0], ylim[1] * 1.4) if yscale.log else (ylim[0], ylim[1] + 0.12 * (ylim[1] - ylim[0]))
        oom_y = ylim[1] / 1.15 if yscale.log else ylim[1] - 0.05 * (ylim[1] - ylim[0])
    xlim = padded_limits([float(b) for b in batches], xlog, pad=0.06)
    predicted = "predicted " if group.predicted else ""
    single = len(panels) == 1
    ends: list[Label] = []  # lines reaching the largest batch: labelled in a column right of the axes
    inline: list[Label] = []  # lines that stop earlier: labelled next to their last point
    obstacles: list[tuple[float, float]] = []
    for ax, (family, members) in zip(axes, panels, strict=False):
        style_axis(ax, "y", yscale)
        if xlog:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(int(b)) for b in batches])
        if xlog:
            ax.minorticks_off()
        ax.set_ylim(*ylim)
        ax.set_xlim(*xlim)
        if family:
            ax.set_title(family, fontsize=9)
        if single:
            ax.set_xlabel("batch size" + (" (log scale)" if xlog else ""))
            ax.set_ylabel(axis_label(predicted + "peak allocated memory", yscale))
        if cap is not None:
            ax.axhline(cap, color=OOM_COLOR, ls="--", lw=1.0, alpha=0.8)
            ax.text(
                xlim[1],
                cap,
                f"{group.capacity_name} {fmt_bytes(capacity)} ",
                va="bottom",
                ha="right",
                fontsize=7 if not single else 8,
                color=OOM_COLOR,
            )
        seen: dict[str, int] = {}
        for variant in members:
            rows = pts[pts["variant"] == variant].sort_values("batch_size")
            method = str(rows["method"].iloc[0])
            index = seen.get(method, 0)
            seen[method] = index + 1
            look = method_style(method)
            linestyle = LINESTYLES[index % len(LINESTYLES)]  # the knob: line style; the method: colour + marker
            good = rows[(rows["status"] == "ok") & rows["peak_allocated_bytes"].notna()]
            gx = [float(b) for b in good["batch_size"]]
            gy = [yscale(v) for v in good["peak_allocated_bytes"]]
            ax.plot(
                gx,
                gy,
                color=look.color,
                ls=linestyle,
                marker=look.marker,
                ms=5,
                lw=1.5,
                zorder=3,
                label=variant,
                gid=f"method={method}",
            )
            failed = rows[rows["status"] == "oom"]
            fx = [float(b) for b in failed["batch_size"]]
            if fx and oom_y is not None:
                ax.scatter(fx, [oom_y] * len(fx), marker="X", s=70, color=look.color, edgecolors=OOM_COLOR, zorder=5)
                if gx:
                    ax.plot([gx[-1], fx[0]], [gy[-1], oom_y], color=look.color, ls=":", lw=1.0, alpha=0.7)
            if not single:
                continue
            obstacles.extend([*zip(gx, gy, strict=True), *along(gx, gy, xlog, yscale.log)])
            if gx:
                (ends if gx[-1] == batches[-1] else inline).append(Label(gx[-1], gy[-1], variant, look.color))
            elif fx and oom_y is not None:
                inline.append(Label(fx[0], oom_y, f"{variant} (OOM)", look.color))
        if not single:
            ax.legend(fontsize=6.5, frameon=False, loc="best", handlelength=2.6)
    for ax in axes[len(panels) :]:
        ax.remove()  # no empty panel
    if not single:
        fig.supxlabel("batch size" + (" (log scale)" if xlog else ""), fontsize=9)
        fig.supylabel(axis_label(predicted + "peak allocated memory", yscale), fontsize=9)
    handles: list[Line2D] = []
    if len(oom):
        where = "on the capacity line" if cap is not None else "along the top"
        handles.append(
            Line2D([], [], marker="X", ls="", color="#888888", markeredgecolor=OOM_COLOR, ms=8, label=f"OOM ({where})")
        )
    if single:  # the panels' own legends say the same
        handles.append(
            Line2D([], [], color="#555555", lw=1.5, label="one line per method, labelled at its last ok batch")
        )
    fig.suptitle(f"{group.headline('Peak memory vs batch size')}\n{group.title}", fontsize=11)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    set_log_ticks(fig)
    fig.canvas.draw()  # lay out once, to know the axes height the labels are stacked in
    if single:
        stack_labels(fig, axes[0], ends, yscale.log)
    freeze_layout(fig)
    if single:
        place_labels(fig, axes[0], inline, obstacles)
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
    """Stacked horizontal bars, weights / gradients / optimizer state / activations (always this order), per
    method at one batch size: the composition at the tracked peak, largest total at the top."""
    rows = pts[(pts["batch_size"] == batch) & (pts["status"] == "ok") & pts["mem_weights_bytes"].notna()]
    columns = [c for c, _, _ in CATEGORIES]
    totals_all = rows.set_index("variant")[columns].fillna(0.0).sum(axis=1)
    order = sorted(totals_all.index, key=lambda v: (float(totals_all[v]), str(v)))  # by size, never by name
    rows = rows.set_index("variant").loc[order]
    totals = rows[columns].sum(axis=1)
    scale = choose_scale("bytes", [*totals, *rows["peak_allocated_bytes"].dropna()])
    scale = type(scale)(scale.divisor, scale.unit, False)  # stacked bars stay linear
    fig = new_figure(9.0, 1.3 + 0.42 * len(rows) + 0.8)
    ax = fig.subplots()
    positions = list(range(len(rows)))
    left = [0.0] * len(rows)
    largest = float(totals.max()) if len(totals) else 0.0
    for column, name, color in CATEGORIES:
        values = rows[column].fillna(0.0)
        widths = [scale(v) for v in values]
        if float(values.max()) <= 0.005 * largest:  # drawn, but too thin to see: the legend says why
            name += " (≈0 at the peak)"
        ax.barh(positions, widths, left=left, color=color, label=name, height=0.62, edgecolor="white", lw=0.5)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    peak_handle = None
    for y, (variant, row), total in zip(positions, rows.iterrows(), left, strict=True):
        ax.text(total, y, f"  {fmt_bytes(totals[variant])}", va="center", ha="left", fontsize=8)
        peak = row["peak_allocated_bytes"]
        if peak == peak and abs(peak - totals[variant]) > 0.005 * peak:  # headline differs from the tracked step
            peak_handle = ax.plot([scale(peak)] * 2, [y - 0.38, y + 0.38], color="black", lw=1.6)[0]
    ax.set_yticks(positions, order)
    for tick, variant in zip(ax.get_yticklabels(), order, strict=True):
        method = str(rows.loc[variant, "method"])
        tick.set_color(method_style(method).color)
        tick.set_gid(f"method={method}")
    ax.set_xlim(0, max(left, default=1.0) * 1.18)
    style_axis(ax, "x", scale)
    predicted = "predicted " if group.predicted else ""
    ax.set_xlabel(axis_label(f"live memory at the {predicted}peak of one training step", scale))
    if peak_handle is not None:
        peak_handle.set_label("peak allocated (measured steps)")
    fig.suptitle(f"{group.headline('Memory breakdown')} at the peak, batch size {batch}\n{group.title}", fontsize=11)
    fig.legend(loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    return fig
