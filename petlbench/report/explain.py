"""The "why" view: memory over one training step and where the activations at the peak come from.

Reads the summaries stored beside the rows (`results/<suite>/timelines/<run_id>.npz`,
petlbench.why). Two consumers:

- the report's timeline view (petlbench/report/views/timelines.py): `timeline_figure` compares the methods at one
  batch size (a panel per method, same axes, stacked areas by category, the peak marked), `heat_figure` draws a
  per-block heat strip (blocks × sublayer).
- `explain` (the core of `petlbench explain`): one run's peak, when it happens, its breakdown and top modules,
  and, with another run, the difference module pattern by module pattern.

Torch-free: numpy, pandas and (for figures) matplotlib only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from petlbench.errors import ConfigError, ResultsError
from petlbench.fmt import fmt_bytes
from petlbench.report.frame import Group
from petlbench.report.rows import load_rows, row_label, run_label
from petlbench.why import (
    CATEGORIES,
    SUBLAYER_GROUP,
    SUBLAYERS,
    Grouped,
    WhyData,
    find_timelines,
    group_entries,
    heat_strip,
    load_why,
    parents,
    pattern,
    sublayer_pattern,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

CATEGORY_COLORS: Final = {
    "weights": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer": "#55a868",
    "activations": "#8172b3",
}


def _unit(largest: float) -> tuple[float, str]:
    """A binary byte unit that keeps `largest` between 1 and 1024."""
    for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if largest >= 1024**power:
            return float(1024**power), name
    return 1.0, "B"


# ---------------------------------------------------------------------------------------------------------------
# The report's timeline figures (views/timelines.py draws the section)


def timelines_for(paths: Sequence[Path], rows: pd.DataFrame) -> dict[str, Path]:
    """run_id → timeline file, for the given rows that have one."""
    found = find_timelines(paths)
    return {str(r): found[str(r)] for r in rows["run_id"] if str(r) in found}


def choose_why_batch(pts: pd.DataFrame, have: set[str]) -> int | None:
    """The batch size at which the most methods have a timeline (ties: the largest)."""
    ok = pts[(pts["status"] == "ok") & pts["run_id"].isin(have)]
    if ok.empty:
        return None
    counts = ok.groupby("batch_size")["variant"].nunique()
    best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return int(best[0])


def at_peak(why: WhyData, category: str) -> int:
    return sum(e.bytes for e in why.entries if e.category == category)


def timeline_figure(group: Group, runs: Sequence[tuple[str, WhyData]], batch: int) -> Figure:
    """One panel per method, same axes: stacked live bytes by category over the step, the peak marked."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 1.0 + 1.5 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    div, unit = _unit(max(w.peak_bytes for _, w in runs))
    top = max(w.peak_bytes for _, w in runs) / div * 1.12
    for ax, (variant, why) in zip(axes, runs, strict=True):
        x = np.asarray(why.x, dtype=float) / max(why.events - 1, 1)
        layers = [np.asarray(why.live[c], dtype=float) / div for c in CATEGORIES]
        ax.stackplot(x, *layers, colors=[CATEGORY_COLORS[c] for c in CATEGORIES], labels=list(CATEGORIES), alpha=0.85)
        for name, start in why.phases[1:]:
            ax.axvline(start / max(why.events - 1, 1), color="0.3", linestyle="--", linewidth=0.8)
            ax.text(start / max(why.events - 1, 1), top * 0.98, f" {name}", va="top", fontsize=7, color="0.3")
        px = why.peak_event / max(why.events - 1, 1)
        ax.plot([px], [why.peak_bytes / div], "o", color="black", markersize=4)
        ax.annotate(
            f"peak {fmt_bytes(why.peak_bytes)} ({why.peak_phase})",
            (px, why.peak_bytes / div),
            textcoords="offset points",
            xytext=(6, -10),
            fontsize=8,
        )
        ax.set_ylim(0, top)
        ax.set_xlim(0, 1)
        ax.set_ylabel(unit)
        ax.set_title(variant, fontsize=9, loc="left")
        ax.grid(True, alpha=0.25)
    axes[-1].set_xlabel("position in the training step (allocation events; forward → backward → optimizer)")
    axes[0].legend(loc="upper left", fontsize=7, ncols=4, framealpha=0.8)
    fig.suptitle(f"Memory over one training step, batch {batch}\n{group.title}", fontsize=9)
    return fig


def heat_figure(group: Group, runs: Sequence[tuple[str, WhyData]], batch: int) -> Figure:
    """Per method a strip sublayer × block of activation bytes at the peak, one colour scale for all."""
    import numpy as np
    from matplotlib.figure import Figure

    raw = [heat_strip(w.entries) for _, w in runs]
    blocks = max(r.shape[0] for r in raw)
    div, unit = _unit(max(float(r.max()) for r in raw))
    strips = [np.pad(r, ((0, blocks - r.shape[0]), (0, 0))).T / div for r in raw]  # [sublayer, block]
    vmax = max(float(s.max()) for s in strips) or 1.0
    fig = Figure(figsize=(9.0, 0.9 + 1.35 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    image = None
    labels = [f"{s} ({SUBLAYER_GROUP[s]})" if s in ("qkv", "fc1") else s for s in SUBLAYERS]
    for ax, (variant, _), strip in zip(axes, runs, strips, strict=True):
        image = ax.imshow(strip, aspect="auto", cmap="magma_r", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(SUBLAYERS)), labels, fontsize=6)
        ax.set_xticks(range(strip.shape[1]), [str(i) for i in range(strip.shape[1])], fontsize=7)
        ax.set_title(variant, fontsize=9, loc="left")
        for (i, j), value in np.ndenumerate(strip):
            if value >= 0.25 * vmax:
                text = f"{value:.0f}" if value >= 10 else f"{value:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white")
    axes[-1].set_xlabel("block")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label=f"activation {unit} live at the peak", shrink=0.8)
    fig.suptitle(f"Which parts of the backbone each method keeps alive, batch {batch}\n{group.title}", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# `petlbench explain`


@dataclass(frozen=True)
class RunWhy:
    run_id: str
    label: str  # method, batch and setting
    short: str  # method and batch
    why: WhyData

    def category(self, name: str) -> int:
        return at_peak(self.why, name)


@dataclass(frozen=True)
class Difference:
    name: str  # module pattern (blocks.* for every block)
    a: int
    b: int

    @property
    def delta(self) -> int:
        return self.a - self.b


@dataclass(frozen=True)
class Explanation:
    run: RunWhy
    top: list[Grouped]  # activation bytes by module pattern, largest first
    top_modules: list[Grouped]  # by single module, largest first
    by_block: list[Grouped]  # by block (`blocks.7`) and sublayer group
    other: RunWhy | None = None
    # activation bytes by sublayer pattern (wrappers folded: `sublayer_pattern`), largest |delta| first
    differences: list[Difference] | None = None


def select_run(rows: pd.DataFrame, run: str | None, method: str | None, batch_size: int | None) -> pd.Series:
    """The one row named by `run` (a run_id or a unique prefix of one) or by method (a variant 'lora rank=8', a
    method 'vpt-deep' or a tuner 'fact') + batch."""
    if run is not None:
        hit = rows[rows["run_id"].astype(str).str.startswith(run)]
        if hit.empty:
            raise ConfigError(f"--run {run}: no such run_id in the results; `petlbench report` lists them")
        if len(hit) > 1:
            raise ConfigError(f"--run {run}: matches {len(hit)} runs; give more of the run_id")
        found: pd.Series = hit.iloc[0]
        return found
    if method is None:
        raise ConfigError("give --run RUN_ID, or --method METHOD (with --batch-size when it ran at several)")
    hit = rows[(rows["variant"] == method) | (rows["method"] == method) | (rows["tuner"] == method)]
    if batch_size is not None:
        hit = hit[hit["batch_size"] == batch_size]
    hit = hit[hit["status"] == "ok"]
    if hit.empty:
        known = ", ".join(sorted({str(v) for v in rows["variant"]}))
        raise ConfigError(
            f"--method {method}: no ok run{f' at batch size {batch_size}' if batch_size else ''}; methods: {known}"
        )
    if hit["run_id"].nunique() > 1:
        raise ConfigError(_ambiguous(method, batch_size, hit))
    chosen: pd.Series = hit.iloc[0]
    return chosen


def _ambiguous(method: str, batch_size: int | None, hit: pd.DataFrame) -> str:
    """Several runs match `--method`: name what tells them apart (the variant, the batch size, else the run_id)."""
    variants = sorted({str(v) for v in hit["variant"]})
    batches = sorted({int(b) for b in hit["batch_size"].dropna()})
    at = f" at batch size {batch_size}" if batch_size is not None else ""
    if len(variants) > 1:
        quoted = (
            " and ".join(f"'{v}'" for v in variants) if len(variants) == 2 else ", ".join(f"'{v}'" for v in variants)
        )
        return f"--method {method}: {len(hit)} runs match{at}: {quoted}; name one, e.g. --method '{variants[-1]}'"
    if len(batches) > 1:
        sizes = ", ".join(str(b) for b in batches)
        return f"--method {method}: runs at batch sizes {sizes}; add --batch-size (e.g. --batch-size {batches[-1]})"
    choices = "; ".join(f"{r['run_id']} ({row_label(r)})" for _, r in hit.iterrows())
    return f"--method {method}: {len(hit)} runs match ({choices}); choose one with --run RUN_ID"


def _run_why(row: pd.Series, files: dict[str, Path]) -> RunWhy:
    run_id = str(row["run_id"])
    if run_id not in files:
        raise ResultsError(
            f"run {run_id} ({row_label(row)}): no stored timeline (timelines/{run_id}.npz); "
            "re-run it with this petlbench (`petlbench run --force` or `petlbench estimate`)"
        )
    return RunWhy(run_id, row_label(row), run_label(row), load_why(files[run_id]))


def explain(
    paths: Sequence[Path],
    run: str | None = None,
    method: str | None = None,
    batch_size: int | None = None,
    vs: str | None = None,
    top: int = 8,
) -> Explanation:
    """One run's peak, its timing in the step, breakdown and top modules; with `vs`, the difference to that run.

    `vs` is a run_id (prefix) or a method name (at the same batch size as the first run).
    """
    rows = load_rows(paths)
    files = find_timelines(paths)
    first = select_run(rows, run, method, batch_size)
    one = _run_why(first, files)
    entries = one.why.entries
    explanation = Explanation(
        run=one,
        top=group_entries(entries, pattern, ["activations"])[:top],
        top_modules=group_entries(entries, lambda m: m, ["activations"])[:top],
        by_block=group_entries(entries, lambda m: parents(m, 0), ["activations"])[:top],
    )
    if vs is None:
        return explanation
    if rows["run_id"].astype(str).str.startswith(vs).any():
        second = select_run(rows, vs, None, None)
    else:
        second = select_run(rows, None, vs, int(first["batch_size"]))
    other = _run_why(second, files)
    a = {g.name: g.bytes for g in group_entries(entries, sublayer_pattern, ["activations"])}
    b = {g.name: g.bytes for g in group_entries(other.why.entries, sublayer_pattern, ["activations"])}
    diffs = [Difference(n, a.get(n, 0), b.get(n, 0)) for n in sorted(a.keys() | b.keys())]
    diffs = sorted((d for d in diffs if d.delta), key=lambda d: (-abs(d.delta), d.name))
    return Explanation(explanation.run, explanation.top, explanation.top_modules, explanation.by_block, other, diffs)
