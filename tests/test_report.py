"""`petlbench report` from hand-built rows: files, facet splits, frontier list, failures; no torch, no runs."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.errors import ConfigError, ResultsError
from petlbench.report import build_report
from petlbench.report.frame import points, split_groups
from petlbench.report.plots import choose_batch, max_feasible
from petlbench.report.rows import normalise
from tests.report_rows import GiB, frame, row, sweep, write

FIGURES = ("pareto-acc-vs-memory", "pareto-acc-vs-params", "pareto-throughput-vs-memory", "memory-batch", "breakdown")


def flat(text: str) -> str:
    return " ".join(text.split())


def test_report_writes_every_figure_per_group_and_the_documents(tmp_path: Path) -> None:
    results = write(sweep(), tmp_path / "results" / "mem")
    out = tmp_path / "reports"
    summary = build_report([results], out=out)

    # two precisions → two groups, never one figure
    assert summary.split_by == ["precision"]
    assert len(summary.groups) == 2
    slugs = ["mem-nvidia-h100-80gb-hbm3-fp32", "mem-nvidia-h100-80gb-hbm3-bf16-mixed"]
    for slug in slugs:
        for figure in FIGURES:
            for suffix in (".png", ".svg"):
                path = out / f"{figure}-{slug}{suffix}"
                assert path.is_file() and path.stat().st_size > 1000, path
    assert len(summary.figures) == len(FIGURES) * 2
    assert summary.statuses == {"error": 1, "ok": 18, "oom": 1}

    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "Rows differ in **precision**" in md
    assert "· fp32 ·" in md and "· bf16-mixed ·" in md
    # the frontier list: ordered by memory; the NaN-accuracy LoRA r8 point at batch 64 is not on the front
    assert (
        "**Accuracy vs peak memory** (max top-1 accuracy, min peak allocated memory) — batch 32: "
        "linear → lora rank=4 → lora rank=8 → full; batch 64: linear → lora rank=4 → full; batch 128: "
    ) in md
    assert "1 ok run(s) without" not in md  # figure-only text
    # failures: both the OOM and the error, with the first line of the error only
    failed = md[md.index("## Failed runs") :]
    assert "| oom | out of memory at batch size 128: CUDA out of memory |" in failed
    assert "| error | RuntimeError: shapes |" in failed
    assert "second line" not in failed and "more" not in failed.split("RuntimeError: shapes")[1][:10]
    # memory vs batch: OOM cell and max feasible batch
    assert "| full | 21.0 GiB | 30.0 GiB | OOM | 64 (oom at 128) |" in md
    # environment block
    assert "| GPU | NVIDIA H100 80GB HBM3 |" in md and "| git sha | 0123456789 |" in md
    # html carries the same tables and the SVGs
    assert "<table>" in html and 'src="pareto-acc-vs-memory-mem-nvidia-h100-80gb-hbm3-fp32.svg"' in html
    assert "RuntimeError: shapes" in html
    assert "![Accuracy vs peak memory" in md and "(pareto-acc-vs-memory-mem-nvidia-h100-80gb-hbm3-fp32.png)" in md


def test_memory_only_results_draw_throughput_and_params_fronts(tmp_path: Path) -> None:
    rows = [
        row(t, b, peak=p * b * GiB / 8, params=n, ips=i)
        for t, p, n, i in (("full", 3, 10**6, 100), ("linear", 1, 10**3, 400), ("lora", 2, 10**4, 200))
        for b in (8, 16)
    ]
    out = tmp_path / "reports"
    summary = build_report([write(rows, tmp_path / "r")], plots=["pareto"], out=out)
    names = sorted(p.name for p in summary.figures)
    assert names == [
        "pareto-params-vs-memory-mem-nvidia-h100-80gb-hbm3-fp32.png",
        "pareto-throughput-vs-memory-mem-nvidia-h100-80gb-hbm3-fp32.png",
    ]
    assert not list(out.glob("pareto-acc-*"))
    md = (out / "report.md").read_text()
    assert (
        "**Training throughput vs peak memory** (max training throughput, min peak allocated memory) — "
        "batch 8: linear; batch 16: linear" in md
    )


def test_old_figures_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    out.mkdir()
    (out / "pareto-acc-vs-memory-old-group.png").write_bytes(b"x")
    (out / "notes.png").write_bytes(b"mine")
    rows = [row("linear", 8, peak=GiB), row("full", 8, peak=2 * GiB)]
    build_report([write(rows, tmp_path / "r")], plots=["breakdown"], out=out)
    assert not (out / "pareto-acc-vs-memory-old-group.png").exists()
    assert (out / "notes.png").exists()
    assert (out / "breakdown-mem-nvidia-h100-80gb-hbm3-fp32.png").exists()


def test_groups_split_on_attention_and_backbone_and_failed_runs_join_their_siblings() -> None:
    rows = normalise(
        frame(
            [
                row("lora", 8, knob=8, peak=GiB),
                row("full", 8, status="oom"),  # no attn_kernel recorded: belongs with the fused rows
                row("lora", 8, knob=8, peak=GiB, **{"backbone.fused_attn": False, "attn_kernel": "math"}),
                row("lora", 8, knob=8, peak=GiB, **{"backbone.model": "vit_small_patch16_224"}),
            ]
        )
    )
    groups, varying = split_groups(rows)
    assert sorted(varying) == sorted(["backbone", "fused attention", "attention kernel"])
    assert len(groups) == 3
    fused = next(g for g in groups if g.facets["attn_kernel"] == "flash" and "small" not in g.title)
    assert sorted(fused.rows["status"]) == ["ok", "oom"]
    assert len({g.slug for g in groups}) == 3
    unfused = next(g for g in groups if g.facets["attn_kernel"] == "math")
    assert "timm unfused" in unfused.title and "unfused" in unfused.slug


def test_points_average_seeds_and_keep_failures() -> None:
    rows = normalise(
        frame(
            [
                row("lora", 8, knob=8, peak=100.0, acc=0.5, run_id="a", seed=0),
                row("lora", 8, knob=8, peak=200.0, acc=0.7, run_id="b", seed=1),
                row("full", 8, status="oom", run_id="c"),
            ]
        )
    )
    pts = points(rows).set_index("variant")
    assert pts.loc["lora rank=8", "peak_allocated_bytes"] == 150.0
    assert pts.loc["lora rank=8", "acc_top1"] == pytest.approx(0.6)
    assert pts.loc["lora rank=8", "runs"] == 2
    assert pts.loc["full", "status"] == "oom" and pts.loc["full", "error"].startswith("oom: boom")


def test_breakdown_batch_choice() -> None:
    def pts(specs: list[tuple[str, int, str]]) -> pd.DataFrame:
        return points(normalise(frame([row(t, b, status=s, peak=GiB) for t, b, s in specs])))

    every = pts(
        [
            ("full", 8, "ok"),
            ("full", 16, "ok"),
            ("full", 32, "oom"),
            ("lora", 8, "ok"),
            ("lora", 16, "ok"),
            ("lora", 32, "ok"),
        ]
    )
    assert choose_batch(every) == 16  # the largest batch both ran ok
    assert choose_batch(every, requested=32) == 32
    assert choose_batch(every, requested=64) is None
    nobody = pts([("full", 8, "ok"), ("lora", 16, "ok"), ("lora", 32, "ok"), ("vpt", 32, "ok")])
    assert choose_batch(nobody) == 32  # no common batch: the most common one
    assert max_feasible(every) == {"full": "16 (oom at 32)", "lora": "32"}


def test_batch_size_without_runs_is_a_config_error(tmp_path: Path) -> None:
    results = write([row("full", 8, peak=GiB)], tmp_path / "r")
    with pytest.raises(ConfigError, match=r"--batch-size 64: .* batch sizes with one: 8"):
        build_report([results], out=tmp_path / "o", batch_size=64)


def test_unknown_plot_and_empty_results(tmp_path: Path) -> None:
    results = write([row("full", 8, peak=GiB)], tmp_path / "r")
    with pytest.raises(ConfigError, match="--plot: unknown scatter"):
        build_report([results], plots=["scatter"], out=tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="no result rows"):
        build_report([tmp_path / "empty"], out=tmp_path / "o")


def test_cli_report(tmp_path: Path) -> None:
    results = write([row("full", 8, peak=2 * GiB, acc=0.9), row("linear", 8, peak=GiB, acc=0.7)], tmp_path / "r")
    out = tmp_path / "reports"
    result = CliRunner().invoke(app, ["report", str(results), "--plot", "breakdown", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 rows (2 ok) in 1 group(s)" in flat(result.output)
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert [p.name for p in out.glob("*.png")] == ["breakdown-mem-nvidia-h100-80gb-hbm3-fp32.png"]

    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "no such results file or folder" in flat(missing.output)
    bad = CliRunner().invoke(app, ["report", str(results), "--plot", "scatter"])
    assert bad.exit_code == 2


def test_nan_free_frame_helpers() -> None:
    # a column of all-None metrics (memory-only suite) must load as NaN floats, not objects
    rows = normalise(frame([row("full", 8, peak=GiB, acc=None)]))
    assert rows["acc_top1"].dtype == "float64" and math.isnan(rows["acc_top1"].iloc[0])
    assert rows["variant"].tolist() == ["full"]
