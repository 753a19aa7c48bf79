"""Rich renderings of `petlbench explain` (tables only; the command prints them)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from petlbench.cli.tables import Col, FitTable
from petlbench.fmt import fmt_bytes
from petlbench.report.explain import Explanation, RunWhy
from petlbench.why import CATEGORIES, Grouped, module_label


def _signed(value: int) -> str:
    return ("+" if value > 0 else "−" if value < 0 else "") + fmt_bytes(abs(value))


def _modules_table(title: str, groups: list[Grouped], activations: int) -> FitTable:
    columns = [Col("module", wrap=True), Col("activation bytes", "right"), Col("share", "right")]
    table = FitTable(columns, title=title, title_justify="left")  # narrower than its minimum: one block per row
    for g in groups:
        table.add_row(module_label(g.name), fmt_bytes(g.bytes), f"{g.bytes / activations:.0%}" if activations else "-")
    return table


def run_summary(run: RunWhy) -> RenderableType:
    why = run.why
    head = Text.assemble(
        (run.label, "bold"),
        f"  run {run.run_id}\n",
        "peak ",
        (fmt_bytes(why.peak_bytes), "bold"),
        f" ({why.peak_bytes:,} B) in {why.peak_phase}, at {why.peak_fraction:.0%} of the step "
        f"(event {why.peak_event:,} of {why.events:,})",
    )
    columns = [Col("category"), Col("bytes", "right"), Col("share", "right")]
    breakdown = FitTable(columns, title="live at the peak", title_justify="left")
    for category in CATEGORIES:
        value = run.category(category)
        breakdown.add_row(category, fmt_bytes(value), f"{value / why.peak_bytes:.0%}" if why.peak_bytes else "-")
    return Group(head, breakdown)


def explanation_view(result: Explanation) -> RenderableType:
    """One run: peak, when, breakdown, top modules; with a second run, the difference by module pattern."""
    activations = result.run.category("activations")
    parts: list[RenderableType] = [
        run_summary(result.run),
        _modules_table("top modules (summed over blocks)", result.top, activations),
        _modules_table("top single modules", result.top_modules, activations),
        _modules_table("by block", result.by_block, activations),
    ]
    if result.other is not None and result.differences is not None:
        a, b = result.run, result.other
        parts.append(run_summary(b))
        table = FitTable(
            [Col("module", wrap=True), *(Col(name, "right") for name in (a.short, b.short, "difference"))],
            title=f"activations at the peak by sublayer, summed over blocks: {a.short} vs {b.short}",
            title_justify="left",
        )
        for d in result.differences:
            table.add_row(module_label(d.name), fmt_bytes(d.a), fmt_bytes(d.b), _signed(d.delta))
        parts.append(table)
        lines = [f"peak: {a.short} {_signed(a.why.peak_bytes - b.why.peak_bytes)} vs {b.short}"]
        for d in result.differences[:3]:
            verb = "keeps" if d.delta > 0 else "frees"
            lines.append(f"{a.short} {verb} {module_label(d.name)} tensors: {_signed(d.delta)} vs {b.short}")
        parts.append(Text("\n".join(lines)))
    return Group(*parts)
