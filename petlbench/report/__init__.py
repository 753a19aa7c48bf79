"""`petlbench report`: figures (PNG + SVG, + PDF in paper format), `report.md` and `report.html` from results folders.

`build_report` is the core: it reads rows, splits them into groups that may share a figure
(`frame.split_groups`), draws the Pareto fronts (`pareto`), memory vs batch size and the memory breakdown
(`plots`), and writes the document (`tables`). It never prints; the CLI says where the files went.
Matplotlib is imported only when figures are drawn, so importing this module (the CLI does) stays cheap.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Final

from petlbench import __version__
from petlbench.errors import ConfigError
from petlbench.fmt import UNSTABLE_NOTE, first_line, fmt_bytes, fmt_params, fmt_pct, fmt_rate, missing, noisy
from petlbench.report.document import Block, Bullets, Heading, Image, Para, Table, literal, to_html, to_markdown
from petlbench.report.explain import FIGURE_PREFIXES as WHY_PREFIXES
from petlbench.report.explain import timelines_for, why_section
from petlbench.report.frame import Group, points, split_groups, variant_order
from petlbench.results import load_rows
from petlbench.system import safeio

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PLOT_KINDS: Final = ("pareto", "memory-batch", "breakdown")
_FIGURE_PREFIXES: Final = ("pareto-", "memory-batch-", "breakdown-", "fit-")
FORMATS: Final = ("png", "pdf")
PAPER_WIDTHS: Final = {"double": 7.0, "single": 3.3}  # inches: a two-column and a one-column figure


class Plot(str, Enum):
    """`--plot` choices."""

    pareto = "pareto"
    memory_batch = "memory-batch"
    breakdown = "breakdown"
    all = "all"


@dataclass(frozen=True)
class ReportSummary:
    """What `build_report` wrote."""

    out: Path
    markdown: Path
    html: Path
    figures: list[Path]  # PNGs; each has an SVG beside it
    groups: list[str]  # group titles, in report order
    split_by: list[str]  # the settings that differed between groups
    rows: int
    statuses: dict[str, int]
    notes: list[str] = field(default_factory=list)  # things the reader should know (e.g. a skipped figure)
    vtab_methods: int = 0  # methods in the VTAB-1k tables (0: no VTAB-1k rows, no tables)


def build_report(
    paths: Sequence[Path],
    plots: Collection[str] = PLOT_KINDS,
    out: Path = Path("reports"),
    batch_size: int | None = None,
    fmt: str = "png",
    width: str = "double",
) -> ReportSummary:
    """Read every result row under `paths` and write the figures and the report into `out`.

    Args:
        paths: results folders or parquet files.
        plots: any of "pareto", "memory-batch", "breakdown" ("all" means all three).
        out: output folder (created). Figures from an earlier report there are replaced.
        batch_size: batch size of the breakdown bars; default: the largest batch every method ran ok.
        fmt: "png" (PNG + SVG, screen sizes) or "pdf" (PDF + SVG + PNG sized for a paper, TrueType fonts).
        width: paper format only: "double" (7 in, two-column) or "single" (3.3 in, one-column).

    Raises:
        ResultsError: no rows, or an unreadable results file.
        ConfigError: an unknown plot kind, or a `batch_size` no run finished at.
    """
    from petlbench.report.style import PaperFormat, paper_format

    kinds = _kinds(plots)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown {fmt!r}; valid: {', '.join(FORMATS)}")
    if width not in PAPER_WIDTHS:
        raise ConfigError(f"--width: unknown {width!r}; valid: {', '.join(PAPER_WIDTHS)}")
    rows = load_rows(paths)
    if batch_size is not None and "breakdown" in kinds:
        done = rows.loc[(rows["status"] == "ok") & rows["mem_weights_bytes"].notna(), "batch_size"]
        if not (done == batch_size).any():
            present = ", ".join(str(int(b)) for b in sorted(done.unique())) or "none"
            raise ConfigError(
                f"--batch-size {batch_size}: no run with a memory breakdown finished ok at that batch size; "
                f"batch sizes with one: {present}"
            )
    groups, split_by = split_groups(rows)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_figures(out)

    why_files = timelines_for(paths, rows)
    statuses = {str(k): int(v) for k, v in rows["status"].value_counts().sort_index().items()}
    notes: list[str] = []
    figures: list[Path] = []
    blocks: list[Block] = _preamble(paths, rows, statuses, groups, split_by)
    paper = PaperFormat(PAPER_WIDTHS[width]) if fmt == "pdf" else None
    with paper_format(paper):
        for number, group in enumerate(groups, 1):
            pts = points(group.rows)
            blocks.extend(_group_section(number, group, pts, kinds, batch_size, out, figures, notes))
            if "breakdown" in kinds and why_files:
                blocks.extend(why_section(group, pts, why_files, lambda fig, stem: _save(fig, out, stem, figures)))
    vtab_blocks, vtab_methods = _vtab_section(rows)
    blocks.extend(vtab_blocks)
    blocks.extend(_failures(rows, groups))

    markdown = out / "report.md"
    html = out / "report.html"
    safeio.write_text(markdown, to_markdown(blocks))  # whole or not at all, never through a link
    safeio.write_text(html, to_html(blocks, "petlbench report"))
    return ReportSummary(
        out, markdown, html, figures, [g.title for g in groups], split_by, len(rows), statuses, notes, vtab_methods
    )


def _kinds(plots: Collection[str]) -> list[str]:
    wanted = set(PLOT_KINDS) if "all" in plots else set(plots)
    unknown = sorted(wanted - set(PLOT_KINDS))
    if unknown or not wanted:
        raise ConfigError(f"--plot: unknown {', '.join(unknown) or '(none)'}; valid: {', '.join(PLOT_KINDS)}, all")
    return [k for k in PLOT_KINDS if k in wanted]


def _remove_old_figures(out: Path) -> None:
    for path in out.iterdir():
        if path.suffix in (".png", ".svg", ".pdf") and path.name.startswith((*_FIGURE_PREFIXES, *WHY_PREFIXES)):
            path.unlink()


def _save(fig: Figure, out: Path, stem: str, figures: list[Path]) -> str:
    """PNG + SVG; in paper format also a PDF with TrueType fonts (survive printing and editing)."""
    from petlbench.report.style import PAPER_RC, paper_active

    png = out / f"{stem}.png"
    paper = paper_active()
    # each file under a temp name, renamed when whole: an interrupt never leaves a cut figure under its name
    with safeio.atomic_writer(png) as handle:
        fig.savefig(handle, format="png", dpi=300 if paper else 110)
    with safeio.atomic_writer(out / f"{stem}.svg") as handle:
        fig.savefig(handle, format="svg", metadata={"Date": None})
    if paper:
        import matplotlib

        with matplotlib.rc_context(PAPER_RC), safeio.atomic_writer(out / f"{stem}.pdf") as handle:
            fig.savefig(handle, format="pdf", metadata={"CreationDate": None})  # fonts are embedded at save time
    figures.append(png)
    log.info("wrote %s (+ .svg%s)", png, " + .pdf" if paper else "")
    return stem


# ---------------------------------------------------------------------------------------------------------------
# Document sections


def _preamble(
    paths: Sequence[Path], rows: pd.DataFrame, statuses: dict[str, int], groups: list[Group], split_by: list[str]
) -> list[Block]:
    counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    sources = ", ".join(f"`{p}`" for p in paths)
    notes = []
    if split_by:
        notes.append(
            f"Rows differ in **{', '.join(split_by)}**, so they are split into {len(groups)} groups; no figure or "
            "table mixes two groups (each group's settings are in its heading, figure titles and file names)."
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
            "mixed in." + (" Groups of estimate rows say *predicted* in every title." if estimate.any() else "")
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
    blocks: list[Block] = [
        Heading("petlbench report", 1),
        Para(f"{len(rows)} result rows from {sources} ({counts}); petlbench {__version__}."),
        Bullets(notes),
        Heading("Environment"),
        _environment(rows),
    ]
    return blocks


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


def _environment(rows: pd.DataFrame) -> Block:
    table_rows = []
    for name, column in _ENV_ROWS:
        if column not in rows:
            continue
        values = [v for v in rows[column] if not missing(v)]
        if not values:
            continue
        shown = [fmt_bytes(float(v)) if column == "env.gpu_memory_bytes" else _env_value(column, v) for v in values]
        counts = Counter(shown)
        text = (
            next(iter(counts))
            if len(counts) == 1
            else ", ".join(f"{value} ({n} rows)" for value, n in counts.most_common())
        )
        table_rows.append([name, text])
    return Table(["setting", "value"], table_rows)


def _env_value(column: str, value: object) -> str:
    if column == "env.git_sha":
        return str(value)[:10]
    if column == "env.git_dirty":
        return "yes (uncommitted changes)" if value in (True, "True") else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _group_section(
    number: int,
    group: Group,
    pts: pd.DataFrame,
    kinds: list[str],
    batch_size: int | None,
    out: Path,
    figures: list[Path],
    notes: list[str],
) -> list[Block]:
    statuses = Counter(str(s) for s in group.rows["status"])
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    blocks: list[Block] = [
        Heading(f"{number}. {literal(group.title)}"),
        Para(f"{len(group.rows)} runs ({counts}); figure files end in `{group.slug}`."),
    ]
    if not (pts["status"] == "ok").any():
        blocks.append(Para("No run in this group finished ok: nothing to draw (see Failed runs)."))
        notes.append(f"{group.title}: no ok run, no figures")
        return blocks
    if "pareto" in kinds:
        blocks.extend(_pareto_section(group, pts, out, figures))
    if "memory-batch" in kinds:
        blocks.extend(_memory_batch_section(group, pts, out, figures))
        if group.predicted:
            blocks.extend(_fit_section(group, pts, out, figures))
    if "breakdown" in kinds:
        blocks.extend(_breakdown_section(group, pts, batch_size, out, figures, notes))
    return blocks


def _pareto_section(group: Group, pts: pd.DataFrame, out: Path, figures: list[Path]) -> list[Block]:
    from petlbench.report.pareto import describe_axes, front_sequences, frontier_flags, pareto_figure, pareto_specs

    blocks: list[Block] = [Heading(group.headline("Pareto fronts"), 3)]
    specs = pareto_specs(pts)
    flags = {spec.name: frontier_flags(pts, spec) for spec in specs}
    fronts: list[str] = []
    for spec in specs:
        fig = pareto_figure(group, pts, spec, flags[spec.name])
        stem = _save(fig, out, f"pareto-{spec.name}-{group.slug}", figures)
        blocks.append(Image(stem, f"{group.headline(spec.title)}, {group.title}"))
        panels = [
            f"batch {batch}: {' → '.join(names)}" for batch, names in front_sequences(pts, spec, flags[spec.name])
        ]
        if panels:
            fronts.append(f"**{spec.title}** ({describe_axes(spec)}) — " + "; ".join(panels))
    blocks.append(Heading(group.headline("Frontier"), 4))
    blocks.append(Bullets(fronts or ["(no point has both values)"]))
    multi_seed = bool((pts["runs"] > 1).any())
    peak_name = "predicted peak memory" if group.predicted else "peak memory"
    columns = ["method", "batch", "status", "trainable params", peak_name]
    if pts["train_images_per_s"].notna().any():
        columns.append("train img/s")
    if pts["acc_top1"].notna().any():
        columns += ["acc (final)", "acc (best)"]
    if multi_seed:
        columns.append("runs averaged")
    columns += [f"front: {spec.name}" for spec in specs]
    rows = []
    on_front = {spec.name: flags[spec.name].tolist() for spec in specs}
    for position, (_, p) in enumerate(pts.iterrows()):
        row = [
            str(p["variant"]),
            str(int(p["batch_size"])),
            str(p["status"]),
            fmt_params(p["params_trainable"]),
            fmt_bytes(p["peak_allocated_bytes"]) if p["status"] == "ok" else "-",
        ]
        if "train img/s" in columns:
            row.append(noisy(fmt_rate(p["train_images_per_s"], "").strip(), p["timing_unstable"]))
        if "acc (final)" in columns:
            row += [fmt_pct(p["acc_top1"]), fmt_pct(p["acc_top1_best"])]
        if multi_seed:
            row.append(str(p["runs"]))
        row += ["✓" if on_front[spec.name][position] else "" for spec in specs]
        rows.append(row)
    blocks.append(Heading(group.headline("Points"), 4))
    blocks.append(Table(columns, rows, frozenset(range(3, len(columns)))))
    if "train img/s" in columns and pts["timing_unstable"].astype(bool).any():
        blocks.append(Para(UNSTABLE_NOTE))
    return blocks


def _memory_batch_section(group: Group, pts: pd.DataFrame, out: Path, figures: list[Path]) -> list[Block]:
    from petlbench.report.plots import max_feasible, memory_batch_figure

    fig = memory_batch_figure(group, pts)
    stem = _save(fig, out, f"memory-batch-{group.slug}", figures)
    batches = sorted(int(b) for b in pts["batch_size"].dropna().unique())
    feasible = max_feasible(pts)
    rows = []
    for variant in variant_order(pts):
        cells = [variant]
        for batch in batches:
            hit = pts[(pts["variant"] == variant) & (pts["batch_size"] == batch)]
            if hit.empty:
                cells.append("")
            elif hit["status"].iloc[0] == "ok":
                cells.append(fmt_bytes(hit["peak_allocated_bytes"].iloc[0]))
            else:
                cells.append(str(hit["status"].iloc[0]).upper())
        cells.append(feasible[variant])
        rows.append(cells)
    columns = ["method", *[f"bs {b}" for b in batches], "max feasible batch"]
    capacity = group.capacity
    if group.predicted:
        where = (
            f"Judged against {fmt_bytes(capacity)} of device memory (`memory_limit_bytes`), drawn as the dashed line."
            if capacity
            else "No device memory given (`--device-memory`): no limit drawn."
        )
    elif capacity:
        where = f"Device capacity: {fmt_bytes(capacity)} (`env.gpu_memory_bytes`)."
    else:
        where = "Device capacity unknown (CPU rows): OOM runs, if any, are drawn along the top."
    return [
        Heading(group.headline("Peak memory vs batch size"), 3),
        Image(stem, f"{group.headline('Peak memory vs batch size')}, {group.title}"),
        Table(columns, rows, frozenset(range(1, len(columns)))),
        Para(where),
    ]


def _fit_section(group: Group, pts: pd.DataFrame, out: Path, figures: list[Path]) -> list[Block]:
    """What fits on my GPU: per method the largest swept batch predicted to fit in each memory size."""
    from petlbench.report.fit import fit_figure, fit_rows, memory_sizes, size_label

    sizes = memory_sizes(group.rows)
    table = fit_rows(pts, sizes, variant_order(pts))
    title = group.headline("Largest batch that fits per GPU memory size")
    fig = fit_figure(title, group.title, table, sizes)
    stem = _save(fig, out, f"fit-{group.slug}", figures)
    columns = ["method", *[size_label(s) for s in sizes]]
    rows = [[variant, *[f.text() for f in fits]] for variant, _, fits in table]
    return [
        Heading(title, 3),
        Image(stem, f"{title}, {group.title}"),
        Table(columns, rows, frozenset(range(1, len(columns)))),
        Para(
            "The largest batch size of the sweep whose predicted peak is at most the memory size; `+`: the largest "
            "batch swept fits (larger ones were not estimated); `none`: even the smallest does not."
        ),
    ]


def _breakdown_section(
    group: Group, pts: pd.DataFrame, batch_size: int | None, out: Path, figures: list[Path], notes: list[str]
) -> list[Block]:
    from petlbench.report.plots import CATEGORIES, breakdown_figure, choose_batch

    batch = choose_batch(pts, batch_size)
    if batch is None:
        why = f"no run finished ok at batch size {batch_size}" if batch_size else "no ok run has a breakdown"
        notes.append(f"{group.title}: no breakdown figure ({why})")
        return [Heading("Memory breakdown", 3), Para(f"No breakdown: {why}.")]
    at = pts[(pts["batch_size"] == batch) & (pts["status"] == "ok") & pts["mem_weights_bytes"].notna()]
    everyone = set(at["variant"]) == set(pts.loc[pts["status"] == "ok", "variant"])
    if batch_size is not None:
        why = "chosen with --batch-size"
    elif everyone:
        why = "the largest batch size every method ran ok"
    else:
        why = "the most common batch size; no batch size has every method ok"
    fig = breakdown_figure(group, pts, batch)
    stem = _save(fig, out, f"breakdown-{group.slug}", figures)
    rows = []
    tracked = at.set_index("variant")["mem_tracked_peak_bytes"]
    for variant in sorted(variant_order(at), key=lambda v: -float(tracked.get(v, 0.0) or 0.0)):
        p = at[at["variant"] == variant].iloc[0]
        rows.append(
            [
                variant,
                *[fmt_bytes(p[column]) for column, _, _ in CATEGORIES],
                fmt_bytes(p["mem_tracked_peak_bytes"]),
                fmt_bytes(p["peak_allocated_bytes"]),
            ]
        )
    columns = ["method", *[name for _, name, _ in CATEGORIES], "tracked peak", "peak allocated"]
    heading = group.headline(f"Memory breakdown at the peak, batch size {batch}")
    return [
        Heading(heading, 3),
        Para(
            f"Batch size {batch}: {why}. Bars are the composition *at the peak* of one tracked training step "
            "(weights, gradients, optimizer state, activations, always in this order), largest first; they sum to "
            "the tracked peak. Gradients are often ≈0 there (legend: ≈0 at the peak): from a small batch on, the peak "
            "is reached at the start of the backward pass, before gradients exist."
        ),
        Image(stem, f"{heading}, {group.title}"),
        Table(columns, rows, frozenset(range(1, len(columns)))),
    ]


def _vtab_section(rows: pd.DataFrame) -> tuple[list[Block], int]:
    """The VTAB-1k tables (tasks × methods, both means), final-epoch and best-of-evaluations, when VTAB rows exist."""
    from petlbench.report.vtab import vtab_table

    if "data.name" not in rows or not (rows["data.name"] == "vtab1k").any():
        return [], 0
    records = rows[rows["data.name"] == "vtab1k"].to_dict("records")
    blocks: list[Block] = []
    methods = 0
    for metric in ("acc_top1", "acc_top1_best"):
        table = vtab_table(records, metric)
        if table.rows:
            blocks.extend(table.blocks())
            methods = max(methods, len(table.rows))
    return blocks, methods


def _failures(rows: pd.DataFrame, groups: list[Group]) -> list[Block]:
    slug_of = {index: g.slug for g in groups for index in g.rows.index}
    failed = rows[rows["status"] != "ok"]
    blocks: list[Block] = [Heading("Failed runs")]
    if failed.empty:
        blocks.append(Para("None: every run finished ok."))
        return blocks
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
    blocks.append(
        Table(["run_id", "group", "method", "batch", "status", "error (first line)"], table_rows, frozenset({3}))
    )
    return blocks
