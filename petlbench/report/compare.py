"""`petlbench compare A B`: a baseline and a change, joined run by run, with the deltas that matter.

Pure: rows in, a `Comparison` out (the CLI renders it, `comparison_figure` draws it). Runs are matched by
`run_id` (same suite, same spec); runs left over are matched by their spec without the suite name (a renamed
suite, or two suites that share runs). Only runs `ok` on both sides have deltas; the rest are counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from petlbench.fmt import missing
from petlbench.spec.models import PAIR_COLUMNS

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

# What identifies a run apart from its suite; measured columns (GPU name, kernel) are not part of the spec.
SPEC_KEY: Final = ("variant", *(c for c in PAIR_COLUMNS if c not in ("suite", "env.gpu_name", "attn_kernel")))
METRICS: Final = (
    ("peak_allocated_bytes", "peak memory"),
    ("train_images_per_s", "throughput"),
    ("acc_top1", "accuracy"),
)
SPEED: Final = "train_images_per_s"
NOISE_COLOR: Final = "#b0b0b0"


@dataclass(frozen=True)
class Timing:
    """What a throughput comparison needs of one side: its median step time, interquartile range and flag."""

    median_s: float | None
    iqr_s: float | None
    unstable: bool

    @classmethod
    def of(cls, row: pd.Series) -> Timing:
        flag = row.get("timing_unstable")
        return cls(_number(row.get("step_time_median_s")), _number(row.get("step_time_iqr_s")), _truthy(flag))


def _truthy(value: Any) -> bool:
    return not missing(value) and bool(value) and str(value).lower() not in ("false", "0")


@dataclass(frozen=True)
class Delta:
    """One run present and ok in both folders: baseline and change value per metric (None: not measured)."""

    label: str  # 'lora rank=8 bs=32 fp32'
    run_id: str
    values: dict[str, tuple[float | None, float | None]]
    timing: tuple[Timing, Timing] = (Timing(None, None, False), Timing(None, None, False))

    def relative(self, metric: str) -> float | None:
        """(change − baseline) / baseline; None when either side has no value or the baseline is 0."""
        before, after = self.values.get(metric, (None, None))
        if before is None or after is None or before == 0:
            return None
        return (after - before) / abs(before)

    def speed_verdict(self) -> Literal["change", "noise", "unstable", "unknown"]:
        """Whether the throughput change is a change: both timings stable, and their interquartile ranges of step
        time do not overlap (|median₁ − median₂| > (IQR₁ + IQR₂) / 2). `noise`: within that spread; `unstable`: a
        side was flagged `timing_unstable`; `unknown`: a side has no timing."""
        before, after = self.timing
        if before.unstable or after.unstable:
            return "unstable"
        if before.median_s is None or after.median_s is None or self.relative(SPEED) is None:
            return "unknown"
        spread = ((before.iqr_s or 0.0) + (after.iqr_s or 0.0)) / 2
        return "change" if abs(after.median_s - before.median_s) > spread else "noise"

    def absolute(self, metric: str) -> float | None:
        before, after = self.values.get(metric, (None, None))
        return None if before is None or after is None else after - before


@dataclass(frozen=True)
class Comparison:
    deltas: list[Delta]  # sorted by the size of the memory change, largest first
    only_baseline: int
    only_change: int
    not_ok: list[str] = field(default_factory=list)  # matched runs whose status changed: 'label: ok → oom'
    matched_by_spec: int = 0  # pairs matched by spec (no shared run_id)
    broke: list[str] = field(default_factory=list)  # ok in the baseline, not ok in the change (a regression too)

    def regressions(self, max_increase: float) -> list[Delta]:
        """Runs whose peak memory grew by more than `max_increase` (a fraction: 0.01 = 1 %)."""
        return [d for d in self.deltas if (d.relative("peak_allocated_bytes") or 0.0) > max_increase]


def _number(value: Any) -> float | None:
    if missing(value):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _label(row: pd.Series) -> str:
    return f"{row['variant']} bs={int(row['batch_size'])} {row['precision']}"


def compare_rows(baseline: pd.DataFrame, change: pd.DataFrame) -> Comparison:
    """Join the two row sets run by run (run_id, then the spec without the suite) and compute the deltas."""
    base = baseline.set_index("run_id", drop=False)
    new = change.set_index("run_id", drop=False)
    pairs: list[tuple[pd.Series, pd.Series]] = [(base.loc[r], new.loc[r]) for r in base.index.intersection(new.index)]
    left = base.drop(index=base.index.intersection(new.index))
    right = new.drop(index=base.index.intersection(new.index))
    key = [c for c in SPEC_KEY if c in left.columns and c in right.columns]

    def spec_key(row: pd.Series) -> tuple[str, ...]:
        return tuple("-" if missing(row[c]) else str(row[c]) for c in key)

    waiting: dict[tuple[str, ...], pd.Series] = {spec_key(r): r for _, r in right.iterrows()}
    by_spec = 0
    unmatched_left = 0
    for _, r in left.iterrows():
        other = waiting.pop(spec_key(r), None)
        if other is None:
            unmatched_left += 1
        else:
            pairs.append((r, other))
            by_spec += 1
    deltas: list[Delta] = []
    not_ok: list[str] = []
    broke: list[str] = []
    for before, after in pairs:
        if before["status"] != "ok" or after["status"] != "ok":
            if before["status"] != after["status"]:
                not_ok.append(f"{_label(before)}: {before['status']} → {after['status']}")
            if before["status"] == "ok":
                broke.append(_label(before))
            continue
        values = {column: (_number(before.get(column)), _number(after.get(column))) for column, _ in METRICS}
        deltas.append(Delta(_label(before), str(before["run_id"]), values, (Timing.of(before), Timing.of(after))))
    deltas.sort(key=lambda d: (-abs(d.relative("peak_allocated_bytes") or 0.0), d.label))
    return Comparison(deltas, unmatched_left, len(waiting), sorted(not_ok), by_spec, sorted(broke))


def comparison_figure(comparison: Comparison, baseline: str, change: str, top: int = 30) -> Figure:
    """Horizontal bars of the relative change per run, one panel per metric, largest memory change first."""
    from petlbench.report.style import OOM_COLOR, new_figure

    shown = comparison.deltas[:top]
    metrics = [(c, n) for c, n in METRICS if any(d.relative(c) is not None for d in shown)]
    fig = new_figure(3.2 * max(len(metrics), 1) + 2.5, 1.5 + 0.25 * max(len(shown), 1))
    axes = fig.subplots(1, max(len(metrics), 1), sharey=True, squeeze=False).ravel()
    positions = list(range(len(shown)))[::-1]
    for ax, (column, name) in zip(axes, metrics, strict=False):
        values = [100 * (d.relative(column) or 0.0) for d in shown]
        worse = [(v > 0) == (column == "peak_allocated_bytes") and v != 0 for v in values]
        colors = [OOM_COLOR if w else "#2ca02c" for w in worse]
        if column == SPEED:  # a change within the timing noise is drawn grey: neither better nor worse
            colors = [c if d.speed_verdict() == "change" else NOISE_COLOR for c, d in zip(colors, shown, strict=True)]
        ax.barh(positions, values, color=colors, height=0.6)
        ax.axvline(0, color="#333333", lw=0.8)
        ax.set_xlabel(f"{name} change (%)")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_yticks(positions, [d.label for d in shown], fontsize=7)
    fig.suptitle(f"{change} vs {baseline}: change per run (red: worse; grey: within timing noise)", fontsize=10)
    return fig


def describe(comparison: Comparison) -> Sequence[str]:
    """Notes for the end of the table: unmatched runs, status changes, spec-matched pairs."""
    notes = []
    if comparison.only_baseline or comparison.only_change:
        notes.append(
            f"{comparison.only_baseline} runs only in the baseline, {comparison.only_change} only in the change"
        )
    if comparison.matched_by_spec:
        notes.append(f"{comparison.matched_by_spec} runs matched by spec (different suite name)")
    notes.extend(f"status changed: {line}" for line in comparison.not_ok)
    verdicts = [d.speed_verdict() for d in comparison.deltas]
    noisy = verdicts.count("noise") + verdicts.count("unstable")
    if noisy:
        notes.append(
            f"throughput: {noisy} of {len(verdicts)} changes are within timing noise (~: interquartile ranges overlap, "
            f"or a side is flagged timing_unstable); only {verdicts.count('change')} are changes"
        )
    return notes
