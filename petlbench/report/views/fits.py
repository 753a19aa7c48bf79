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
        from petlbench.report.fit import as_fit, fit_cell, fit_figure, fit_rows, memory_sizes, searched_fits, size_label

        group, pts = section.group, section.pts
        variants = variant_order(pts)
        labels, found = searched_fits(group.rows, variants)  # the points keep no text column: read the rows
        title = group.headline("Largest batch that fits" + (" per GPU" if labels else " per GPU memory size"))
        if labels:  # the estimator searched each card on its replay: its answers, as stored
            rows_ = group.rows
            cuda = bool((rows_["device"] == "cuda").any())
            methods = {v: str(rows_.loc[rows_["variant"] == v, "method"].iloc[0]) for v in found}
            table = [(v, methods[v], [as_fit(found[v].get(label)) for label in labels]) for v in variants if v in found]
            cells = [[v, *[fit_cell(found[v].get(label), cuda) for label in labels]] for v, _, _ in table]
            columns = list(labels)
            what = "predicted reserved memory" if cuda else "predicted peak"
            note = (
                f"The largest batch predicted to fit each card, searched on the estimator's replay (not limited to "
                f"the sweep), with the {what} there in brackets"
                + ("; FITS: reserved + context + headroom ≤ the card's memory" if cuda else "")
                + "; `+`: the search's upper bound fits; `none`: not even batch 1; `-`: not searched."
            )
            legend = "largest batch that fits (+: the search's upper bound fits)"
        else:  # read off the sweep, at common memory sizes
            sizes = memory_sizes(group.rows)
            table = fit_rows(pts, sizes, variants)
            cells = [[variant, *[f.text() for f in fits]] for variant, _, fits in table]
            columns = [size_label(s) for s in sizes]
            note = (
                "The largest batch size of the sweep whose predicted peak is at most the memory size; `+`: the "
                "largest batch swept fits (larger ones were not estimated); `none`: even the smallest does not."
            )
            legend = "largest batch of the sweep that fits (+: the largest batch swept fits)"
        out = Rendered([Heading(title, 3)])
        figure = fit_figure(title, group.title, table, columns, legend)
        out.image(ctx.save(figure, f"fit-{group.slug}"), f"{title}, {group.title}")
        out.add(Table(["method", *columns], cells, frozenset(range(1, len(columns) + 1))), Para(note))
        return out
