"""The VTAB-1k tables (tasks × methods, group and flat means), final-epoch and best-of-evaluations, after the
groups, whenever the rows include VTAB-1k rows."""

from __future__ import annotations

from petlbench.report.views.view import DocumentView, Rendered, ReportContext


class Vtab(DocumentView):
    name = "vtab"
    title = "VTAB-1k tables"

    def applies(self, ctx: ReportContext) -> bool:
        return "data.name" in ctx.rows and bool((ctx.rows["data.name"] == "vtab1k").any())

    def render(self, ctx: ReportContext) -> Rendered:
        from petlbench.report.vtab import vtab_table

        records = ctx.rows[ctx.rows["data.name"] == "vtab1k"].to_dict("records")
        out = Rendered(counts={"vtab_methods": 0})
        for metric in ("acc_top1", "acc_top1_best"):
            table = vtab_table(records, metric)
            if table.rows:
                out.add(*table.blocks())
                out.counts["vtab_methods"] = max(out.counts["vtab_methods"], len(table.rows))
        return out
