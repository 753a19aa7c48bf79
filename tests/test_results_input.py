"""Results as input: failed rows in `check`, foreign or newer parquet files, and strings from results in report.md."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from petlbench.cli.app import app
from tests.report_rows import MiB, row, write


def flat(text: str) -> str:
    return " ".join(text.split())


def test_check_reports_an_oom_row_as_its_outcome_never_as_a_comparison(tmp_path: Path) -> None:
    """An oom row counted its parameters before it ran out of memory: 56,010 must not be compared with the limit."""
    rows = [
        row("lora", 8, knob=8, device="cpu", peak=10 * MiB, params=5_000, suite="smoke"),
        row("lora", 64, knob=8, device="cpu", status="oom", params=56_010, suite="smoke", error="out of memory"),
    ]
    results = write(rows, tmp_path / "results" / "smoke")
    budgets = tmp_path / "b.yaml"
    budgets.write_text("budgets:\n  - select: {tuner: lora}\n    max_params_trainable: 100000\n")
    result = CliRunner().invoke(app, ["check", "--budgets", str(budgets), str(results)])
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert "params_trainable: run ended oom: out of memory" in text
    assert "56,010" not in text and "regenerate" not in text


def _good_and_foreign(tmp_path: Path) -> tuple[Path, Path]:
    results = write(
        [row("lora", 8, knob=8, device="cpu", peak=10 * MiB, suite="smoke")], tmp_path / "results" / "smoke"
    )
    foreign = results / "prices.parquet"
    pd.DataFrame({"item": ["apple"], "price": [1.5]}).to_parquet(foreign, index=False)
    return results, foreign


def _smoke_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "smoke.yaml"
    suite.write_text(
        "name: smoke\ndevice: cpu\nbackbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 1}}\n"
        "data: {name: synthetic, num_classes: 10}\nbatch_size: 2\ntuners: [{tuner: linear}]\n"
    )
    return suite


def test_a_foreign_parquet_file_is_refused_by_every_command(tmp_path: Path) -> None:
    results, foreign = _good_and_foreign(tmp_path)
    budgets = tmp_path / "b.yaml"
    budgets.write_text("budgets:\n  - select: {tuner: lora}\n    max_params_trainable: 100000\n")
    suite = _smoke_suite(tmp_path)
    runner = CliRunner()
    commands = [
        ["report", str(results), "--out", str(tmp_path / "reports")],
        ["check", "--budgets", str(budgets), str(results)],
        ["run", str(suite), "--results-dir", str(tmp_path / "results"), "--no-preflight", "--dry-run"],
        ["validate", str(suite), "--results-dir", str(tmp_path / "results"), "--no-preflight"],
    ]
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        text = flat(result.output)
        assert f"{foreign}: not a petlbench results file (no run_id, schema_version, suite, status column)" in text
        assert "move it out of the results folder" in text and "Traceback" not in text


def test_a_newer_schema_is_refused_by_run_planning_too(tmp_path: Path) -> None:
    """Before: `run` read only run_id and status, so a row of a newer petlbench counted as done."""
    from petlbench.spec.expand import expand
    from petlbench.spec.loading import load_suite

    suite = _smoke_suite(tmp_path)
    (run,) = expand(load_suite(suite), "cpu")
    newer = row("linear", 2, device="cpu", suite="smoke", run_id=run.run_id, schema_version=99)
    write([newer], tmp_path / "results" / "smoke")
    result = CliRunner().invoke(
        app, ["run", str(suite), "--results-dir", str(tmp_path / "results"), "--no-preflight", "--dry-run"]
    )
    assert result.exit_code == 2, result.output
    assert "written with result schema 99, newer than this petlbench (1)" in flat(result.output)


def test_markdown_cells_and_literal_spans_are_plain_text() -> None:
    from petlbench.report.document import Heading, Para, Table, literal, to_html, to_markdown

    nasty = "a*b*_c_ `x` [link](http://e) <img src=x> | ~~s~~ &amp; $m$ \\"
    blocks = [Heading(f"1. {literal(nasty)}"), Para(f"see `code` and {literal(nasty)}"), Table(["error"], [[nasty]])]
    md = to_markdown(blocks)
    escaped = r"a\*b\*\_c\_ \`x\` \[link\](http://e) \<img src=x\> \| \~\~s\~\~ \&amp; \$m\$ \\"
    assert md.splitlines()[0] == f"## 1. {escaped}"
    assert f"see `code` and {escaped}" in md  # the block's own markup stays markup
    assert f"| {escaped} |" in md
    page = to_html(blocks, "t")
    assert "<code>code</code>" in page and "<code>x</code>" not in page and "<img" not in page
    assert "a*b*_c_ `x` [link](http://e) &lt;img src=x&gt; | ~~s~~ &amp;amp; $m$ \\" in page


def test_report_md_escapes_strings_from_results(tmp_path: Path) -> None:
    error = "RuntimeError: shape [2, 3] * mismatch | see <details> `x`"
    rows = [
        row("lora", 8, knob=8, device="cpu", peak=10 * MiB, suite="suite_a"),
        row("lora", 16, knob=8, device="cpu", status="error", suite="suite_a", error=error),
    ]
    results = write(rows, tmp_path / "results" / "suite_a")
    result = CliRunner().invoke(app, ["report", str(results), "--out", str(tmp_path / "reports"), "--plot", "pareto"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "reports" / "report.md").read_text()
    assert r"RuntimeError: shape \[2, 3\] \* mismatch \| see \<details\> \`x\`" in md
    (heading,) = [line for line in md.splitlines() if line.startswith("## 1. ")]
    assert r"suite\_a" in heading and "suite_a" not in heading  # the group title names the suite, escaped
