"""`--plot breakdown`: the composition of the tracked peak (weights, gradients, optimizer state, activations) per
method at one batch size: `--batch-size`, else the largest every method ran ok, else the most common."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from petlbench.columns import column
from petlbench.errors import ConfigError
from petlbench.report.document import Block, Heading, Para, Table
from petlbench.report.frame import variant_order
from petlbench.report.views.view import GroupView, Rendered, ReportContext, Section


class Breakdown(GroupView):
    name = "breakdown"
    title = "breakdown figure"
    figures = ("breakdown",)
    needs: ClassVar[Mapping[str, str]] = {"mem_weights_bytes": "a breakdown"}

    def check(self, ctx: ReportContext) -> None:
        if ctx.batch_size is None:
            return
        rows = ctx.rows
        done = rows.loc[(rows["status"] == "ok") & rows["mem_weights_bytes"].notna(), "batch_size"]
        if not (done == ctx.batch_size).any():
            present = ", ".join(str(int(b)) for b in sorted(done.unique())) or "none"
            raise ConfigError(
                f"--batch-size {ctx.batch_size}: no run with a memory breakdown finished ok at that batch size; "
                f"batch sizes with one: {present}"
            )

    def placeholder(self, section: Section, reason: str) -> list[Block]:
        return [Heading("Memory breakdown", 3), Para(f"No breakdown: {reason}.")]

    def render(self, ctx: ReportContext, section: Section) -> Rendered:
        from petlbench.report.plots import CATEGORIES, breakdown_figure, choose_batch

        group, pts = section.group, section.pts
        batch = choose_batch(pts, ctx.batch_size)
        if batch is None:  # --batch-size: another group has a run at it, this one has none
            why = f"no run finished ok at batch size {ctx.batch_size}"
            ctx.note(f"{group.title}: no {self.title} ({why})")
            return Rendered(self.placeholder(section, why))
        at = pts[(pts["batch_size"] == batch) & (pts["status"] == "ok") & pts["mem_weights_bytes"].notna()]
        if ctx.batch_size is not None:
            why = "chosen with --batch-size"
        elif set(at["variant"]) == set(pts.loc[pts["status"] == "ok", "variant"]):
            why = "the largest batch size every method ran ok"
        else:
            why = "the most common batch size; no batch size has every method ok"
        heading = group.headline(f"Memory breakdown at the peak, batch size {batch}")
        out = Rendered(
            [
                Heading(heading, 3),
                Para(
                    f"Batch size {batch}: {why}. Bars are the composition **at the peak** of one tracked training step "
                    "(weights, gradients, optimizer state, activations, always in this order), largest first; they "
                    "sum to the tracked peak. Gradients are often ≈0 there (legend: ≈0 at the peak): from a small "
                    "batch on, the peak is reached at the start of the backward pass, before gradients exist."
                ),
            ]
        )
        out.image(ctx.save(breakdown_figure(group, pts, batch), f"breakdown-{group.slug}"), f"{heading}, {group.title}")
        shown = [*(c for c, _, _ in CATEGORIES), "mem_tracked_peak_bytes", "peak_allocated_bytes"]
        tracked = at.set_index("variant")["mem_tracked_peak_bytes"]
        rows = []
        for variant in sorted(variant_order(at), key=lambda v: -float(tracked.get(v, 0.0) or 0.0)):
            p = at[at["variant"] == variant].iloc[0]
            rows.append([variant, *(column(c).format(p[c]) for c in shown)])
        header = ["method", *[name for _, name, _ in CATEGORIES], column("mem_tracked_peak_bytes").label]
        header.append("peak allocated")
        out.add(Table(header, rows, frozenset(range(1, len(header)))))
        return out
