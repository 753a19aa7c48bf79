"""The report's "largest batch that fits" view of estimate rows that carry a searched answer (`fits_json`): it shows
the searched cards and batches exactly (an auto-batch answer of 2464 with 2465 over reads `2464`, not `2464+`, and
sizes nobody searched get no verdict), names the GPU instead of "cuda", and its figure keeps every text inside
the figure with no two column labels on top of each other."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from petlbench.report import build_report
from petlbench.report.fit import Fit, fit_figure
from tests.report_rows import GiB, row, write
from tests.test_report_figures import capture


def searched(gpu: str, memory: float, best: int | None, over: int | None, reserved: float | None) -> dict[str, Any]:
    return {
        "gpu": gpu,
        "memory_bytes": int(memory),
        "max_batch": best,
        "first_over": over,
        "reserved_bytes": None if reserved is None else int(reserved),
        "allocated_bytes": None if reserved is None else int(reserved * 0.9),
        "required_bytes": None,
    }


def auto_batch_rows() -> list[dict[str, Any]]:
    """What `petlbench estimate` of a batch_size: auto suite on an H100 stores: one row per configuration."""
    rows = []
    for tuner, best, reserved in (("full", 2464, 76.1), ("lora", 3900, 75.8)):
        fits = [searched("h100-80gb", 79.6 * GiB, best, best + 1, reserved * GiB)]
        rows.append(
            row(
                tuner,
                best,
                peak=reserved * 0.9 * GiB,
                ips=None,
                suite="auto.estimate",
                memory_source="estimate",
                memory_limit_bytes=79.6 * GiB,
                gpu_preset="h100-80gb",
                fits_json=json.dumps(fits),
                **{"env.gpu_name": None, "env.gpu_memory_bytes": None},
            )
        )
    return rows


def test_an_auto_batch_estimate_reports_the_searched_answer_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = capture(monkeypatch)
    out = tmp_path / "report"
    build_report([write(auto_batch_rows(), tmp_path / "auto.estimate")], out=out)
    md = (out / "report.md").read_text()
    assert "| method | h100-80gb |" in md  # the searched card only: no 24/48 GiB columns to say "none" in
    assert "| full | 2464 (76.1 GiB) |" in md  # 2465 was over: not "2464+"
    assert "| lora | 3900 (75.8 GiB) |" in md
    section = md.split("### Predicted largest")[1].split("###")[0]
    assert "2464+" not in section and "| none" not in section
    fit = next(fig for stem, fig in figures.items() if stem.startswith("fit-"))
    assert "h100-80gb" in fit.get_suptitle() and " cuda " not in f" {fit.get_suptitle()} "
    cells = {t.get_text() for t in fit.axes[0].texts}
    assert cells == {"2464", "3900"}


def _inside(fig: Figure) -> list[str]:
    """Texts drawn (partly) outside the figure."""
    fig.canvas.draw()  # type: ignore[no-untyped-call]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = fig.bbox
    outside = []
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1 or extent.y1 > box.y1 + 1:
            outside.append(text.get_text())
    return outside


@pytest.mark.parametrize(
    "columns",
    [["h100-80gb"], ["24 GiB", "48 GiB", "80 GiB"], ["h100-80gb", "a100-40gb", "rtx-4090", "t4", "v100-32gb"]],
)
def test_the_fit_figure_keeps_its_title_and_labels_inside_and_apart(columns: list[str]) -> None:
    title = "Predicted largest batch that fits per GPU"
    subtitle = "memory.estimate · h100-80gb · bf16-mixed · vit_base_patch16_224@224 · synthetic"
    table = [(m, m, [Fit(2464, False)] * len(columns)) for m in ("full", "lora rank=8", "adaptformer bottleneck=64")]
    fig = fit_figure(title, subtitle, table, columns, "largest batch that fits (+: the search's upper bound fits)")
    assert _inside(fig) == []
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    labels = sorted(
        (t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels() if t.get_text()), key=lambda b: b.x0
    )
    assert len(labels) == len(columns)
    for left, right in itertools.pairwise(labels):
        assert not left.overlaps(right), (columns, left, right)
