"""VTAB-1k results as the papers print them: tasks × methods, three group means, and both overall means.

A pure function of result rows (no I/O, no pandas needed): `vtab_table(rows, metric)` → `VtabTable`, which
renders itself as report blocks (`blocks()`, for `petlbench report`'s document) or as Markdown. Wiring::

    from petlbench.report.vtab import vtab_table
    from petlbench.results import load_results

    rows = load_results([Path("results/accuracy-vtab")]).to_dict("records")
    print(vtab_table(rows, metric="acc_top1").to_markdown())       # final-epoch accuracy
    print(vtab_table(rows, metric="acc_top1_best").to_markdown())  # best of the test evaluations (test-selected)

`petlbench report` (`build_report`) adds both tables whenever its rows include VTAB-1k rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from petlbench.data.vtab_tasks import GROUPS, TASKS_BY_NAME, VTAB_TASKS, Group, flat_mean, group_mean, group_means
from petlbench.report.document import Block, Bullets, Heading, Table, to_markdown


@dataclass(frozen=True)
class VtabRow:
    """One method's accuracies (percent) per task, its group means and both overall means."""

    method: str
    tasks: Mapping[str, float]  # task name → accuracy in percent (mean over seeds)
    runs: Mapping[str, int]  # task name → number of result rows averaged
    groups: Mapping[Group, float]
    group_mean: float | None
    flat_mean: float | None


@dataclass(frozen=True)
class VtabTable:
    """Tasks × methods, in docs/methods.md task order; `metric` says which accuracy column it holds."""

    metric: str
    rows: tuple[VtabRow, ...]
    ignored: int = 0  # rows that were not VTAB-1k, not ok, or had no value for the metric
    notes: tuple[str, ...] = field(default_factory=tuple)

    def blocks(self, digits: int = 1, heading: str | None = None) -> list[Block]:
        """Report blocks: a heading, the table (per-task %, group means, group mean, flat mean) and its notes."""
        columns = ["method", *(t.display for t in VTAB_TASKS), *GROUPS, "group mean", "flat mean"]
        rows = []
        for row in self.rows:
            cells = [row.method]
            cells += [_fmt(row.tasks.get(t.name), digits) for t in VTAB_TASKS]
            cells += [_fmt(row.groups.get(g), 2) for g in GROUPS]
            cells += [_fmt(row.group_mean, 2), _fmt(row.flat_mean, 2)]
            rows.append(cells)
        notes = [METRIC_CAPTIONS.get(self.metric, f"`{self.metric}`"), *self.notes]
        if self.ignored:
            notes.append(f"{self.ignored} result rows were not ok VTAB-1k rows with `{self.metric}` and were left out.")
        title = heading or f"VTAB-1k: {METRIC_TITLES.get(self.metric, self.metric)}"
        return [Heading(title), Table(columns, rows, frozenset(range(1, len(columns)))), Bullets(notes)]

    def to_markdown(self, digits: int = 1) -> str:
        """The blocks as GitHub Markdown."""
        return to_markdown(self.blocks(digits))


METRIC_TITLES: Final[Mapping[str, str]] = {
    "acc_top1": "final-epoch top-1 (%)",
    "acc_top1_best": "best-of-evaluations top-1 (%), test-selected",
}


METRIC_CAPTIONS: Final[Mapping[str, str]] = {
    "acc_top1": "Top-1 (%) of the final epoch on the test split. Group mean = mean of the Natural/Specialized/"
    "Structured means (VPT/NOAH/FacT papers); flat mean = mean of the 19 tasks (V-PETL Bench).",
    "acc_top1_best": "Top-1 (%), best of the periodic test evaluations: **selected on the test split** (the "
    "FacT/NOAH/SQT papers' protocol; optimistic). Group mean = mean of the three group means; flat mean = mean of "
    "the 19 tasks.",
}


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


MethodKey: TypeAlias = Callable[[Mapping[str, Any]], str]


def method_by(columns: Sequence[str] = ("method",)) -> MethodKey:
    """A method label from result columns, e.g. ("tuner", "tuner.variant") → 'fact variant=tk'."""

    def key(row: Mapping[str, Any]) -> str:
        first = row.get(columns[0])
        if first is None and columns[0] == "method":  # rows written before the method column existed
            first = row.get("tuner")
        parts = [str(first)]
        for column in columns[1:]:
            value = row.get(column)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                parts.append(f"{column.split('.')[-1]}={value}")
        return " ".join(parts)

    return key


def vtab_table(
    rows: Iterable[Mapping[str, Any]],
    metric: Literal["acc_top1", "acc_top1_best"] | str = "acc_top1",
    method: MethodKey | Sequence[str] = ("method",),
    scale: float = 100.0,
) -> VtabTable:
    """Tasks × methods from result rows (dicts with `data.name`, `data.task`, `status` and `metric`).

    Rows of the same method and task (seeds, repeats) are averaged. Accuracies are stored as fractions; `scale`
    turns them into percent. A method's group means and overall means are only given when their tasks are all
    present (a missing task is never averaged away). Methods keep the order they first appear in.

    Args:
        rows: result rows, e.g. `load_results(...).to_dict("records")`.
        metric: `acc_top1` (final epoch) or `acc_top1_best` (best of the test evaluations: test-selected).
        method: columns that name a method (default `method`: the tuner and its method-changing variant,
            fact-tt / fact-tk, vpt-deep / vpt-shallow) or a function row → label.
        scale: multiplier applied to the stored values (100: fractions → percent).
    """
    key = method if callable(method) else method_by(method)
    sums: dict[str, dict[str, list[float]]] = {}
    ignored = 0
    for row in rows:
        task = row.get("data.task")
        value = row.get(metric)
        ok = row.get("status", "ok") == "ok" and row.get("data.name", "vtab1k") == "vtab1k"
        if not ok or task not in TASKS_BY_NAME or value is None or (isinstance(value, float) and math.isnan(value)):
            ignored += 1
            continue
        sums.setdefault(key(row), {}).setdefault(str(task), []).append(float(value) * scale)
    table_rows = []
    for name, per_task in sums.items():
        tasks = {t: sum(v) / len(v) for t, v in per_task.items()}
        table_rows.append(
            VtabRow(
                method=name,
                tasks=tasks,
                runs={t: len(v) for t, v in per_task.items()},
                groups=group_means(tasks),
                group_mean=group_mean(tasks),
                flat_mean=flat_mean(tasks),
            )
        )
    notes = []
    if any(n > 1 for r in table_rows for n in r.runs.values()):
        notes.append("Cells with several result rows (seeds, repeats) show their mean.")
    return VtabTable(metric=metric, rows=tuple(table_rows), ignored=ignored, notes=tuple(notes))
