"""`--plot fit` (drawn with memory-batch too): what fits on my GPU, for estimate groups only — per method the
largest swept batch predicted to fit in each memory size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from petlbench.report.document import Heading, Para, Table
from petlbench.report.frame import variant_order
from petlbench.report.views.view import Groups, GroupView, Rendered, ReportContext, Section


class Fit(GroupView):
    name = "fit"
    title = "fit figure"
    part_of = "memory-batch"
    figures = ("fit",)
    groups: ClassVar[Groups] = "predicted"
    needs: ClassVar[Mapping[str, str]] = {"peak_allocated_bytes": "a predicted peak"}

    def render(self, ctx: ReportContext, section: Section) -> Rendered:
        from petlbench.report.fit import fit_figure, fit_rows, memory_sizes, size_label

        group, pts = section.group, section.pts
        sizes = memory_sizes(group.rows)
        table = fit_rows(pts, sizes, variant_order(pts))
        title = group.headline("Largest batch that fits per GPU memory size")
        out = Rendered([Heading(title, 3)])
        out.image(
            ctx.save(fit_figure(title, group.title, table, sizes), f"fit-{group.slug}"), f"{title}, {group.title}"
        )
        header = ["method", *[size_label(s) for s in sizes]]
        rows = [[variant, *[f.text() for f in fits]] for variant, _, fits in table]
        out.add(
            Table(header, rows, frozenset(range(1, len(header)))),
            Para(
                "The largest batch size of the sweep whose predicted peak is at most the memory size; `+`: the "
                "largest batch swept fits (larger ones were not estimated); `none`: even the smallest does not."
            ),
        )
        return out
