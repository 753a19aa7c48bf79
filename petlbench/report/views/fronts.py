"""`--plot pareto`: the Pareto figures of a group, its frontier per batch size and every point with its memberships.

Which figures: the accuracy fronts when the group trained, else throughput and parameters against memory
(`pareto.pareto_specs`); a figure whose axes no ok point has values on (throughput of an estimate) is left out
with a note.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from petlbench.columns import column
from petlbench.fmt import UNSTABLE_NOTE, fmt_rate, noisy
from petlbench.report.document import Bullets, Heading, Para, Table
from petlbench.report.views.view import GroupView, Rendered, ReportContext, Section

if TYPE_CHECKING:
    import pandas as pd

    from petlbench.report.pareto import ParetoSpec


class Pareto(GroupView):
    name = "pareto"
    title = "Pareto figures"
    figures = ("pareto",)

    def lacking(self, ctx: ReportContext, section: Section) -> str | None:
        from petlbench.report.pareto import pareto_specs

        return None if pareto_specs(section.pts) else "no ok point has values on both axes of any Pareto figure"

    def render(self, ctx: ReportContext, section: Section) -> Rendered:
        from petlbench.report.pareto import (
            WITH_ACCURACY,
            WITHOUT_ACCURACY,
            describe_axes,
            front_sequences,
            frontier_flags,
            pareto_figure,
            pareto_specs,
        )

        group, pts = section.group, section.pts
        specs = pareto_specs(pts)
        candidates = WITH_ACCURACY if pts["acc_top1"].notna().any() else WITHOUT_ACCURACY
        for left_out in (s for s in candidates if s not in specs):
            ctx.note(f"{group.title}: no {left_out.title.lower()} figure ({_no_values(pts, left_out)})")
        flags = {spec.name: frontier_flags(pts, spec) for spec in specs}
        out = Rendered([Heading(group.headline("Pareto fronts"), 3)])
        fronts: list[str] = []
        for spec in specs:
            png = ctx.save(pareto_figure(group, pts, spec, flags[spec.name]), f"pareto-{spec.name}-{group.slug}")
            out.image(png, f"{group.headline(spec.title)}, {group.title}")
            panels = [
                f"batch {batch}: {' → '.join(names)}" for batch, names in front_sequences(pts, spec, flags[spec.name])
            ]
            if panels:
                fronts.append(f"**{spec.title}** ({describe_axes(spec)}) — " + "; ".join(panels))
        out.add(Heading(group.headline("Frontier"), 4), Bullets(fronts or ["(no point has both values)"]))
        out.add(Heading(group.headline("Points"), 4), _points_table(section, specs, flags))
        if pts["train_images_per_s"].notna().any() and pts["timing_unstable"].astype(bool).any():
            out.add(Para(UNSTABLE_NOTE))
        return out


def _no_values(pts: pd.DataFrame, spec: ParetoSpec) -> str:
    ok = pts[pts["status"] == "ok"]
    empty = [axis.column for axis in (spec.x, spec.y) if not ok[axis.column].notna().any()]
    if empty:
        return "no ok point has " + " or ".join(column(c).label for c in empty)
    return "no ok point has both values"


def _points_table(section: Section, specs: tuple[ParetoSpec, ...], flags: dict[str, pd.Series]) -> Table:
    """Every point: method, batch, status, the metrics the figures draw, and its front memberships."""
    pts = section.pts
    multi_seed = bool((pts["runs"] > 1).any())
    speed = bool(pts["train_images_per_s"].notna().any())
    accuracy = bool(pts["acc_top1"].notna().any())
    peak_name = "predicted peak memory" if section.group.predicted else "peak memory"
    header = ["method", "batch", "status", "trainable params", peak_name]
    header += ["train img/s"] if speed else []
    header += ["acc (final)", "acc (best)"] if accuracy else []
    header += ["runs averaged"] if multi_seed else []
    header += [f"front: {spec.name}" for spec in specs]
    on_front = {spec.name: flags[spec.name].tolist() for spec in specs}
    params, peak = column("params_trainable"), column("peak_allocated_bytes")
    final, best = column("acc_top1"), column("acc_top1_best")
    rows = []
    for position, (_, p) in enumerate(pts.iterrows()):
        row = [
            str(p["variant"]),
            str(int(p["batch_size"])),
            str(p["status"]),
            params.format(p["params_trainable"]),
            peak.format(p["peak_allocated_bytes"]) if p["status"] == "ok" else "-",
        ]
        if speed:  # the header names the unit
            row.append(noisy(fmt_rate(p["train_images_per_s"], "").strip(), p["timing_unstable"]))
        if accuracy:
            row += [final.format(p["acc_top1"]), best.format(p["acc_top1_best"])]
        if multi_seed:
            row.append(str(p["runs"]))
        row += ["✓" if on_front[spec.name][position] else "" for spec in specs]
        rows.append(row)
    return Table(header, rows, frozenset(range(3, len(header))))
