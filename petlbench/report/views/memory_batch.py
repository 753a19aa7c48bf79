"""`--plot memory-batch`: peak memory against batch size per method, with the largest batch each ran ok at."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from petlbench.columns import column
from petlbench.fmt import fmt_bytes
from petlbench.report.document import Heading, Para, Table
from petlbench.report.frame import Group, variant_order
from petlbench.report.views.view import GroupView, Rendered, ReportContext, Section


class MemoryBatch(GroupView):
    name = "memory-batch"
    title = "memory vs batch size figure"
    figures = ("memory-batch",)
    needs: ClassVar[Mapping[str, str]] = {"peak_allocated_bytes": "a peak memory"}

    def render(self, ctx: ReportContext, section: Section) -> Rendered:
        from petlbench.report.plots import max_feasible, memory_batch_figure

        group, pts = section.group, section.pts
        heading = group.headline("Peak memory vs batch size")
        out = Rendered([Heading(heading, 3)])
        out.image(ctx.save(memory_batch_figure(group, pts), f"memory-batch-{group.slug}"), f"{heading}, {group.title}")
        batches = sorted(int(b) for b in pts["batch_size"].dropna().unique())
        feasible = max_feasible(pts)
        peak = column("peak_allocated_bytes")
        rows = []
        for variant in variant_order(pts):
            cells = [variant]
            for batch in batches:
                hit = pts[(pts["variant"] == variant) & (pts["batch_size"] == batch)]
                if hit.empty:
                    cells.append("")
                elif hit["status"].iloc[0] == "ok":
                    cells.append(peak.format(hit["peak_allocated_bytes"].iloc[0]))
                else:
                    cells.append(str(hit["status"].iloc[0]).upper())
            cells.append(feasible[variant])
            rows.append(cells)
        header = ["method", *[f"bs {b}" for b in batches], "max feasible batch"]
        out.add(Table(header, rows, frozenset(range(1, len(header)))), Para(_capacity(group)))
        return out


def _capacity(group: Group) -> str:
    capacity = group.capacity
    if group.predicted:
        if capacity:
            return (
                f"Judged against {fmt_bytes(capacity)} of device memory (`memory_limit_bytes`), drawn as the dashed "
                "line."
            )
        return "No device memory given (`--device-memory`): no limit drawn."
    if capacity:
        return f"Device capacity: {fmt_bytes(capacity)} (`env.gpu_memory_bytes`)."
    return "Device capacity unknown (CPU rows): OOM runs, if any, are drawn along the top."
