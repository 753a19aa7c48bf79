"""VTAB-1k: the 19 tasks (METHODS.md §0.4 order, groups, class counts) and the two ways of averaging them.

Torch- and pandas-free: the suite validator reads the class counts, and `vtab_table` turns result rows into the
tasks × methods table a report prints, with both averages:

- **group mean**: the mean of the Natural (7), Specialized (4) and Structured (8) group means — the VPT, NOAH,
  FacT (and very likely SQT) papers' "Average";
- **flat mean**: the mean over the 19 tasks — V-PETL Bench's "Mean".

Wiring it into a report (`petlbench report` is a separate module)::

    from petlbench.results import load_results
    from petlbench.vtab import vtab_table

    rows = load_results([Path("results/accuracy-vtab")]).to_dict("records")
    print(vtab_table(rows, metric="acc_top1").to_markdown())       # final-epoch accuracy
    print(vtab_table(rows, metric="acc_top1_best").to_markdown())  # best of the test evaluations (test-selected)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

Group: TypeAlias = Literal["Natural", "Specialized", "Structured"]
GROUPS: Final[tuple[Group, ...]] = ("Natural", "Specialized", "Structured")


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: its folder name in the FacT/NOAH/SQT layout, display name, group and class count."""

    name: str
    display: str
    group: Group
    num_classes: int


# Order and class counts: METHODS.md §0.4. Folder names: the FacT/NOAH/SQT `vtab-1k/<task>/` layout (and the
# keys of SQT's per-dataset configs, METHODS.md §1.10 / FacT's §2.6).
VTAB_TASKS: Final[tuple[VtabTask, ...]] = (
    VtabTask("cifar", "CIFAR-100", "Natural", 100),
    VtabTask("caltech101", "Caltech101", "Natural", 102),
    VtabTask("dtd", "DTD", "Natural", 47),
    VtabTask("oxford_flowers102", "Flowers102", "Natural", 102),
    VtabTask("oxford_iiit_pet", "Pets", "Natural", 37),
    VtabTask("svhn", "SVHN", "Natural", 10),
    VtabTask("sun397", "Sun397", "Natural", 397),
    VtabTask("patch_camelyon", "Camelyon", "Specialized", 2),
    VtabTask("eurosat", "EuroSAT", "Specialized", 10),
    VtabTask("resisc45", "Resisc45", "Specialized", 45),
    VtabTask("diabetic_retinopathy", "Retinopathy", "Specialized", 5),
    VtabTask("clevr_count", "Clevr-Count", "Structured", 8),
    VtabTask("clevr_dist", "Clevr-Dist", "Structured", 6),
    VtabTask("dmlab", "DMLab", "Structured", 6),
    VtabTask("kitti", "KITTI-Dist", "Structured", 4),
    VtabTask("dsprites_loc", "dSpr-Loc", "Structured", 16),
    VtabTask("dsprites_ori", "dSpr-Ori", "Structured", 16),
    VtabTask("smallnorb_azi", "sNORB-Azim", "Structured", 18),
    VtabTask("smallnorb_ele", "sNORB-Ele", "Structured", 9),
)
TASKS_BY_NAME: Final[Mapping[str, VtabTask]] = {t.name: t for t in VTAB_TASKS}


def group_mean(values: Mapping[str, float]) -> float | None:
    """Mean of the three group means over {task name: accuracy}; None unless all 19 tasks are present."""
    means = [_group_means(values).get(g) for g in GROUPS]
    return None if any(m is None for m in means) else sum(m for m in means if m is not None) / len(GROUPS)


def flat_mean(values: Mapping[str, float]) -> float | None:
    """Mean over the 19 tasks; None unless all 19 are present."""
    if any(t.name not in values for t in VTAB_TASKS):
        return None
    return sum(values[t.name] for t in VTAB_TASKS) / len(VTAB_TASKS)


def _group_means(values: Mapping[str, float]) -> dict[Group, float]:
    """Mean of each group whose tasks are all present (an incomplete group has no mean)."""
    out: dict[Group, float] = {}
    for group in GROUPS:
        tasks = [t.name for t in VTAB_TASKS if t.group == group]
        if all(name in values for name in tasks):
            out[group] = sum(values[name] for name in tasks) / len(tasks)
    return out


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
    """Tasks × methods, in METHODS.md §0.4 task order; `metric` says which accuracy column it holds."""

    metric: str
    rows: tuple[VtabRow, ...]
    ignored: int = 0  # rows that were not VTAB-1k, not ok, or had no value for the metric
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_markdown(self, digits: int = 1) -> str:
        """A GitHub-markdown table: per-task accuracy (%), the three group means, group mean and flat mean."""
        header = ["method", *(t.display for t in VTAB_TASKS), *GROUPS, "group mean", "flat mean"]
        lines = [
            "| " + " | ".join(header) + " |",
            "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
        ]
        for row in self.rows:
            cells = [row.method]
            cells += [_fmt(row.tasks.get(t.name), digits) for t in VTAB_TASKS]
            cells += [_fmt(row.groups.get(g), 2) for g in GROUPS]
            cells += [_fmt(row.group_mean, 2), _fmt(row.flat_mean, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        caption = METRIC_CAPTIONS.get(self.metric, f"`{self.metric}`")
        notes = [caption, *self.notes]
        if self.ignored:
            notes.append(f"{self.ignored} result rows were not ok VTAB-1k rows with `{self.metric}` and were left out.")
        return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


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


def method_by(columns: Sequence[str] = ("tuner",)) -> MethodKey:
    """A method label from result columns, e.g. ("tuner", "tuner.variant") → 'fact variant=tk'."""

    def key(row: Mapping[str, Any]) -> str:
        parts = [str(row.get(columns[0]))]
        for column in columns[1:]:
            value = row.get(column)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                parts.append(f"{column.split('.')[-1]}={value}")
        return " ".join(parts)

    return key


def vtab_table(
    rows: Iterable[Mapping[str, Any]],
    metric: Literal["acc_top1", "acc_top1_best"] | str = "acc_top1",
    method: MethodKey | Sequence[str] = ("tuner",),
    scale: float = 100.0,
) -> VtabTable:
    """Tasks × methods from result rows (dicts with `data.name`, `data.task`, `status` and `metric`).

    Rows of the same method and task (seeds, repeats) are averaged. Accuracies are stored as fractions; `scale`
    turns them into percent. A method's group means and overall means are only given when their tasks are all
    present (a missing task is never averaged away). Methods keep the order they first appear in.

    Args:
        rows: result rows, e.g. `load_results(...).to_dict("records")`.
        metric: `acc_top1` (final epoch) or `acc_top1_best` (best of the test evaluations: test-selected).
        method: columns that name a method (default the tuner) or a function row → label.
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
                groups=_group_means(tasks),
                group_mean=group_mean(tasks),
                flat_mean=flat_mean(tasks),
            )
        )
    notes = []
    if any(n > 1 for r in table_rows for n in r.runs.values()):
        notes.append("Cells with several result rows (seeds, repeats) show their mean.")
    return VtabTable(metric=metric, rows=tuple(table_rows), ignored=ignored, notes=tuple(notes))
