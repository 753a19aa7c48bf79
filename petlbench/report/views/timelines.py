"""`--plot timeline` (drawn with breakdown too): memory over one training step and where the activations at the
peak come from, from the timelines stored beside the rows (`results/<suite>/timelines/<run_id>.npz`).

At one batch size (the one at which the most methods have a timeline): a timeline figure (a panel per method,
stacked live bytes by category), the peak's breakdown per method, the top modules by activation bytes and a
per-block heat strip. The figures are drawn by petlbench.report.explain, which `petlbench explain` shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from petlbench.fmt import fmt_bytes
from petlbench.report.document import Heading, Para, Table
from petlbench.report.frame import variant_order
from petlbench.report.views.view import GroupView, Rendered, ReportContext, Section

if TYPE_CHECKING:
    from petlbench.why import WhyData

TOP_MODULES: Final = 5


class Timeline(GroupView):
    name = "timeline"
    title = "timeline figure"
    part_of = "breakdown"
    figures = ("timeline", "activations")

    def lacking(self, ctx: ReportContext, section: Section) -> str | None:
        from petlbench.report.explain import choose_why_batch

        if choose_why_batch(section.group.rows, set(ctx.timelines)) is None:
            return "no ok run has a stored timeline"
        return None

    def render(self, ctx: ReportContext, section: Section) -> Rendered:
        from petlbench.report.explain import at_peak, choose_why_batch, heat_figure, timeline_figure
        from petlbench.why import CATEGORIES, group_entries, heat_strip, load_why, module_label, sublayer_pattern

        group, rows = section.group, section.group.rows  # not `pts`: seeds are averaged there, timelines are runs'
        files = ctx.timelines
        batch = choose_why_batch(rows, set(files))
        assert batch is not None  # `lacking` said so
        at = rows[(rows["status"] == "ok") & (rows["batch_size"] == batch) & rows["run_id"].isin(set(files))]
        runs: list[tuple[str, WhyData]] = []
        for variant in variant_order(at):
            row = at[at["variant"] == variant].iloc[0]  # several seeds: the first (the step does not depend on it)
            runs.append((variant, load_why(files[str(row["run_id"])])))
        out = Rendered(
            [
                Heading("Why: memory over one training step", 3),
                Para(
                    f"Batch size {batch}. Live bytes by category over the tracked training step (x: the step's "
                    "allocation events in program order, so phases take the width of their allocations, not of their "
                    "time); dashed lines mark where backward and the optimizer step start, the dot is the peak."
                ),
            ]
        )
        png = ctx.save(timeline_figure(group, runs, batch), f"timeline-{group.slug}")
        out.image(png, f"Memory over one training step, batch {batch}, {group.title}")
        breakdown = [
            [
                variant,
                fmt_bytes(why.peak_bytes),
                f"{why.peak_phase} ({why.peak_fraction:.0%} of the step)",
                *(fmt_bytes(at_peak(why, c)) for c in CATEGORIES),
            ]
            for variant, why in runs
        ]
        out.add(Table(["method", "peak", "when", *CATEGORIES], breakdown, frozenset({1, 3, 4, 5, 6})))
        out.add(
            Heading("Where the activations are", 3),
            Para(
                "Activation bytes live at the peak by the module that allocated them (in backward: the module whose "
                "backward was running), summed over blocks (`blocks.*`), a tuner's wrappers folded into the sublayer "
                "they wrap (`mlp.fc1.base` counts as `mlp.fc1`). A frozen layer's saved input shows under "
                "the module that produced it: the input of `mlp.fc2` is the output of `mlp.act`, the input of "
                "`mlp.fc1` that of `norm2`."
            ),
        )
        table = []
        for variant, why in runs:
            total = at_peak(why, "activations")
            for rank, g in enumerate(group_entries(why.entries, sublayer_pattern, ["activations"])[:TOP_MODULES], 1):
                share = g.bytes / total if total else 0.0
                table.append(
                    [variant if rank == 1 else "", str(rank), module_label(g.name), fmt_bytes(g.bytes), f"{share:.0%}"]
                )
        header = ["method", "#", "module", "activation bytes at peak", "share"]
        out.add(Table(header, table, frozenset({1, 3, 4})))
        strips = [(v, w) for v, w in runs if heat_strip(w.entries).size]
        if strips:
            png = ctx.save(heat_figure(group, strips, batch), f"activations-{group.slug}")
            out.image(png, f"Activation bytes at the peak per block and sublayer, batch {batch}, {group.title}")
        return out
