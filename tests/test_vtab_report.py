"""The VTAB-1k table: task order, groups, and both averages, checked against METHODS.md §7.2's computed numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from petlbench.data.vtab_tasks import GROUPS, VTAB_TASKS, flat_mean, group_mean
from petlbench.report.vtab import vtab_table

# METHODS.md §7.2 (V-PETL Bench README), per task in §0.4 order
PUBLISHED = {
    "full": "68.9 87.7 64.3 97.2 86.9 87.4 38.8 79.7 95.7 84.2 73.9 56.3 58.6 41.7 65.5 57.5 46.7 25.7 29.1",
    "vpt-shallow": "77.7 86.9 62.6 97.5 87.3 74.5 51.2 78.2 92.0 75.6 72.9 50.5 58.6 40.5 67.1 68.7 36.1 20.2 34.1",
    "vpt-deep": "78.8 90.8 65.8 98.0 88.3 78.1 49.6 81.8 96.1 83.4 68.4 68.5 60.0 46.5 72.8 73.6 47.9 32.9 37.8",
    "lora": "67.1 91.4 69.4 98.8 90.4 85.3 54.0 84.9 95.3 84.4 73.6 82.9 69.2 49.8 78.5 75.7 47.1 31.0 44.0",
    "fact": "70.6 90.6 70.8 99.1 90.7 88.6 54.1 84.8 96.2 84.5 75.7 82.6 68.2 49.8 80.7 80.8 47.4 33.2 43.0",
    "lst": "59.5 91.5 69.0 99.2 89.9 79.5 54.6 86.9 95.9 85.3 74.1 81.8 61.8 52.2 81.0 71.7 49.5 33.7 45.2",
    "dtl": "69.6 94.8 71.3 99.3 91.3 83.3 56.2 87.1 96.2 86.1 75.0 82.8 64.2 48.8 81.9 93.9 53.9 34.2 47.1",
}
# METHODS.md §7.2 "Both conventions side by side": Natural, Specialized, Structured, group mean, flat mean
COMPUTED = {
    "full": (75.89, 83.38, 47.64, 68.97, 65.57),
    "vpt-shallow": (76.81, 79.67, 46.98, 67.82, 64.85),
    "vpt-deep": (78.49, 82.42, 55.00, 71.97, 69.43),
    "lora": (79.49, 84.55, 59.78, 74.60, 72.25),
    "fact": (80.64, 85.30, 60.71, 75.55, 73.23),
    "lst": (77.60, 85.55, 59.61, 74.25, 71.70),
    "dtl": (80.83, 86.10, 63.35, 76.76, 74.58),
}


def result_rows(tuner: str, values: str, metric: str = "acc_top1", **extra: Any) -> list[dict[str, Any]]:
    """Result rows as the parquet files hold them: accuracies are fractions."""
    return [
        {"tuner": tuner, "status": "ok", "dataset": "vtab1k", "data.name": "vtab1k", "data.task": task.name}
        | {metric: float(v) / 100, **extra}
        for task, v in zip(VTAB_TASKS, values.split(), strict=True)
    ]


def test_task_table_matches_methods_md() -> None:
    assert len(VTAB_TASKS) == 19
    assert [sum(t.group == g for t in VTAB_TASKS) for g in GROUPS] == [7, 4, 8]
    assert [t.num_classes for t in VTAB_TASKS] == [
        *(100, 102, 47, 102, 37, 10, 397),
        *(2, 10, 45, 5),
        *(8, 6, 6, 4, 16, 16, 18, 9),
    ]


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_both_means_reproduce_methods_md_7_2(method: str) -> None:
    table = vtab_table(result_rows(method, PUBLISHED[method]))
    (row,) = table.rows
    natural, specialized, structured, group, flat = COMPUTED[method]
    assert row.groups == pytest.approx(
        {"Natural": natural, "Specialized": specialized, "Structured": structured}, abs=0.005
    )
    assert row.group_mean == pytest.approx(group, abs=0.005)
    assert row.flat_mean == pytest.approx(flat, abs=0.005)


def test_lora_headline_example() -> None:
    values = {t.name: float(v) for t, v in zip(VTAB_TASKS, PUBLISHED["lora"].split(), strict=True)}
    assert round(group_mean(values) or 0, 2) == 74.60 and round(flat_mean(values) or 0, 2) == 72.25


def test_rows_become_a_markdown_table_in_task_order() -> None:
    rows = result_rows("lora", PUBLISHED["lora"]) + result_rows("full", PUBLISHED["full"])
    rows.append({"tuner": "lora", "status": "error", "data.name": "vtab1k", "data.task": "dtd", "acc_top1": None})
    rows.append({"tuner": "lora", "status": "ok", "data.name": "digits", "data.task": None, "acc_top1": 0.9})
    markdown = vtab_table(rows).to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == "## VTAB-1k: final-epoch top-1 (%)"
    header = lines[2]
    assert header.startswith("| method | CIFAR-100 | Caltech101 | DTD |") and header.endswith(
        "| Natural | Specialized | Structured | group mean | flat mean |"
    )
    assert lines[4].startswith("| lora | 67.1 | 91.4 | 69.4 |") and lines[4].endswith("| 74.60 | 72.25 |")
    assert lines[5].startswith("| full |") and lines[5].endswith("| 68.97 | 65.57 |")
    assert "2 result rows were not ok VTAB-1k rows" in markdown


def test_best_of_evaluations_is_flagged_as_test_selected() -> None:
    table = vtab_table(result_rows("lora", PUBLISHED["lora"], metric="acc_top1_best"), metric="acc_top1_best")
    markdown = table.to_markdown()
    assert "test-selected" in markdown and "**selected on the test split**" in markdown
    assert table.rows[0].flat_mean == pytest.approx(72.25, abs=0.005)


def test_missing_tasks_give_no_means_and_seeds_are_averaged() -> None:
    rows = result_rows("lora", PUBLISHED["lora"])[:-1]  # no sNORB-Ele
    rows += [r | {"seed": 1, "acc_top1": r["acc_top1"] + 0.02} for r in result_rows("lora", PUBLISHED["lora"])[:7]]
    (row,) = vtab_table(rows).rows
    assert row.group_mean is None and row.flat_mean is None and "Structured" not in row.groups
    assert row.groups["Natural"] == pytest.approx(79.49 + 1.0, abs=0.005)  # two seeds: +2 points on one of them
    assert row.runs["cifar"] == 2 and row.runs["eurosat"] == 1
    markdown = vtab_table(rows).to_markdown()
    assert "| – | – |" in markdown and "show their mean" in markdown


def test_methods_are_named_by_the_method_column() -> None:
    rows = result_rows("fact", PUBLISHED["fact"], method="fact-tk") + result_rows(
        "fact", PUBLISHED["lora"], method="fact-tt"
    )
    assert [r.method for r in vtab_table(rows).rows] == ["fact-tk", "fact-tt"]


def test_methods_can_be_split_by_a_knob_column() -> None:
    rows = result_rows("fact", PUBLISHED["fact"], **{"tuner.variant": "tk"})
    rows += result_rows("fact", PUBLISHED["lora"], **{"tuner.variant": "tt"})
    table = vtab_table(rows, method=("tuner", "tuner.variant"))
    assert [r.method for r in table.rows] == ["fact variant=tk", "fact variant=tt"]
    assert table.rows[0].group_mean == pytest.approx(75.55, abs=0.005)


def test_report_shows_both_vtab_tables_when_vtab_rows_exist(tmp_path: Path) -> None:
    from petlbench.report import build_report
    from tests.report_rows import row, write

    rows = []
    for method, values in (("lora", PUBLISHED["lora"]), ("vpt-deep", PUBLISHED["vpt-deep"])):
        for task, value in zip(VTAB_TASKS, values.split(), strict=True):
            acc = float(value) / 100
            rows.append(
                row(
                    method,
                    64,
                    acc=acc,
                    method=method,
                    dataset=f"vtab1k/{task.name}",
                    suite="vtab",
                    **{
                        "data.name": "vtab1k",
                        "data.task": task.name,
                    },
                )
            )
    # rows without memory and only the breakdown asked for: no figure to draw, so the test stays fast
    summary = build_report([write(rows, tmp_path / "results")], ["breakdown"], tmp_path / "report")
    markdown = summary.markdown.read_text()
    assert summary.vtab_methods == 2
    assert len(summary.groups) == 19  # a figure never mixes tasks: each is its own dataset
    assert "## VTAB-1k: final-epoch top-1 (%)" in markdown
    assert "## VTAB-1k: best-of-evaluations top-1 (%), test-selected" in markdown
    lora = next(line for line in markdown.splitlines() if line.startswith("| lora | 67.1 |"))
    assert lora.endswith("| 74.60 | 72.25 |")


def test_report_without_vtab_rows_has_no_vtab_table(tmp_path: Path) -> None:
    from petlbench.report import build_report
    from tests.report_rows import row, write

    folder = write([row("lora", 8, peak=1e9, acc=0.5, knob=8.0)], tmp_path / "results")
    summary = build_report([folder], ["pareto"], tmp_path / "report")
    assert summary.vtab_methods == 0 and "VTAB-1k" not in summary.markdown.read_text()
