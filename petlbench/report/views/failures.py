"""Failed runs, at the end of every report: each oom/error/timeout/skipped row with the first line of its error."""

from __future__ import annotations

from petlbench.fmt import first_line
from petlbench.report.document import Heading, Para, Table
from petlbench.report.views.view import DocumentView, Rendered, ReportContext


class Failures(DocumentView):
    name = "failures"
    title = "failed runs"

    def render(self, ctx: ReportContext) -> Rendered:
        rows = ctx.rows
        slug_of = {index: g.slug for g in ctx.groups for index in g.rows.index}
        failed = rows[rows["status"] != "ok"]
        out = Rendered([Heading("Failed runs")])
        if failed.empty:
            out.add(Para("None: every run finished ok."))
            return out
        table_rows = [
            [
                str(r["run_id"]),
                slug_of.get(index, "-"),
                str(r["variant"]),
                str(int(r["batch_size"])) if r["batch_size"] == r["batch_size"] else "-",
                str(r["status"]),
                first_line(r["error"]) or "-",
            ]
            for index, r in failed.sort_values(["status", "suite", "variant", "batch_size"]).iterrows()
        ]
        header = ["run_id", "group", "method", "batch", "status", "error (first line)"]
        out.add(Table(header, table_rows, frozenset({3})))
        return out
