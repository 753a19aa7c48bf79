"""The report's head: what was read, how the rows were split, how to read the figures, and the environment."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar, Final

from petlbench import __version__
from petlbench.columns import column
from petlbench.fmt import fmt_bytes, missing
from petlbench.report.document import Block, Bullets, Heading, Para, Table
from petlbench.report.views.view import DocumentView, Place, Rendered, ReportContext


class Overview(DocumentView):
    name = "overview"
    title = "overview"
    place: ClassVar[Place] = "head"

    def render(self, ctx: ReportContext) -> Rendered:
        rows = ctx.rows
        counts = ", ".join(f"{n} {status}" for status, n in ctx.statuses.items())
        sources = ", ".join(f"`{p}`" for p in ctx.paths)
        return Rendered(
            [
                Heading("petlbench report", 1),
                Para(f"{len(rows)} result rows from {sources} ({counts}); petlbench {__version__}."),
                Bullets(_how_to_read(ctx)),
                Heading("Environment"),
                _environment(ctx),
            ]
        )


def _how_to_read(ctx: ReportContext) -> list[str]:
    rows = ctx.rows
    notes = []
    if ctx.split_by:
        notes.append(
            f"Rows differ in **{', '.join(ctx.split_by)}**, so they are split into {len(ctx.groups)} groups; no "
            "figure or table mixes two groups (each group's settings are in its heading, figure titles and file "
            "names)."
        )
    else:
        notes.append("All rows share device, precision, attention kernel, backbone and dataset: one group.")
    estimate = rows["memory_source"] == "estimate" if "memory_source" in rows else rows["status"].isna()
    if estimate.all():
        limits = sorted({int(v) for v in rows["memory_limit_bytes"].dropna()}) if "memory_limit_bytes" in rows else []
        judged = ", ".join(fmt_bytes(v) for v in limits) or "no device memory (no FITS/OOM verdict)"
        notes.append(
            "**Predicted, not measured**: every row is an estimate (`memory_source = estimate`, the real training "
            "step traced on fake tensors), judged against "
            f"{judged} (`memory_limit_bytes`). For CUDA it predicts `max_memory_allocated` with the CPU→CUDA "
            "deltas; CUDA context, workspaces and fragmentation are not included. Estimates have no throughput "
            "or accuracy: those views are left out."
        )
    else:
        notes.append(
            "Peak memory is `peak_allocated_bytes`: the CUDA caching allocator's peak on GPU, the live-tensor "
            "tracker's exact peak on CPU (`memory_source`). The driver-level peak (CUDA context included) is never "
            "mixed in." + (" Groups of estimate rows say **predicted** in every title." if estimate.any() else "")
        )
    notes.append(
        "OOM runs are drawn as red-edged crosses (at the device capacity line, or in a shaded OOM zone / at the "
        "bottom of an axis when there is no value); error and timeout runs are not drawn and are listed under "
        "Failed runs."
    )
    notes.append(
        "Pareto fronts are computed per batch size among ok runs; front points are joined and labelled, "
        "dominated points are faint."
    )
    if rows["acc_top1"].notna().any():
        notes.append(
            "Accuracy is the final-epoch top-1 on the test split; 'best' is the best evaluation "
            "(selected on the test split, the papers' protocol)."
        )
    return notes


_ENV_ROWS: Final = (
    ("device", "device"),
    ("GPU", "env.gpu_name"),
    ("GPU memory", "env.gpu_memory_bytes"),
    ("GPU compute capability", "env.gpu_capability"),
    ("driver", "env.driver"),
    ("CPU", "env.cpu"),
    ("torch threads", "env.torch_threads"),
    ("torch", "env.torch"),
    ("timm", "env.timm"),
    ("CUDA", "env.cuda"),
    ("cuDNN", "env.cudnn"),
    ("Python", "env.python"),
    ("petlbench", "env.petlbench"),
    ("git sha", "env.git_sha"),
    ("git dirty", "env.git_dirty"),
    ("PYTORCH_CUDA_ALLOC_CONF", "env.alloc_conf"),
    ("platform", "env.platform"),
)


def _environment(ctx: ReportContext) -> Block:
    rows = ctx.rows
    table_rows = []
    for name, key in _ENV_ROWS:
        if key not in rows:
            continue
        values = [v for v in rows[key] if not missing(v)]
        if not values:
            continue
        counts = Counter(_env_value(key, v) for v in values)
        text = (
            next(iter(counts))
            if len(counts) == 1
            else ", ".join(f"{value} ({n} rows)" for value, n in counts.most_common())
        )
        table_rows.append([name, text])
    return Table(["setting", "value"], table_rows)


def _env_value(key: str, value: object) -> str:
    if column(key).kind == "bytes":
        return column(key).format(value)
    if key == "env.git_sha":
        return str(value)[:10]
    if key == "env.git_dirty":
        return "yes (uncommitted changes)" if value in (True, "True") else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
