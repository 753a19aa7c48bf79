"""Limits on input size and shape: nesting depth, file size, alias bombs, run count, table rows, error lines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.cli.console import MAX_PROBLEM_LINES
from petlbench.cli.tables import RUNS_HEAD, RUNS_TAIL
from petlbench.errors import ConfigError
from petlbench.spec.expand import MAX_RUNS, count_runs, expand
from petlbench.spec.loading import MAX_DEPTH, MAX_FILE_BYTES, load_suite, read_yaml

HEAD = "name: x\ndevice: cpu\ndata: {name: synthetic, num_classes: 10}\n"


def _errors(args: list[str]) -> list[str]:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("flow", [True, False])
def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path: Path, flow: bool) -> None:
    path = tmp_path / "deep.yaml"
    if flow:
        path.write_text(HEAD + "tuners: " + "[" * 500 + "]" * 500 + "\n")
    else:
        path.write_text(HEAD + "tuners:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(500)) + "\n")
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DEPTH} levels") as info:
        read_yaml(path)
    assert str(info.value).startswith(f"{path}:") and "\n" not in str(info.value)
    assert len(_errors(["validate", str(path), "--no-preflight"])) == 1


def test_nesting_at_the_limit_still_parses(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert "a" in read_yaml(path)


def test_file_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(HEAD + "description: " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than the 10 MB"):
        read_yaml(path)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="more than 100,000 values once YAML aliases are expanded"):
        read_yaml(path)
    assert time.monotonic() - start < 5


def _product(tmp_path: Path, seeds: int) -> Path:
    path = tmp_path / "product.yaml"
    path.write_text(
        HEAD
        + f"batch_size: {list(range(1, 101))}\nseed: {list(range(seeds))}\n"
        + f"tuners:\n  - tuner: lora\n    grid: {{rank: {list(range(1, 101))}}}\n"
    )
    return path


def test_run_count_is_refused_before_expanding(tmp_path: Path) -> None:
    """1,000,000 runs: counted, not built (building them took minutes and ended in a MemoryError)."""
    path = _product(tmp_path, seeds=100)
    start = time.monotonic()
    lines = _errors(["validate", str(path), "--no-preflight"])
    assert time.monotonic() - start < 10
    assert lines == [
        f"error: {path}: expands to 1,000,000 runs, more than the {MAX_RUNS:,} a suite may have "
        "(tuners[0].grid alone has 100 points); shrink the grids and lists, or split the suite into several files"
    ]
    assert len(_errors(["run", str(path), "--no-preflight", "--dry-run"])) == 1


def test_count_runs_matches_expand(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        HEAD.replace("data: {name: synthetic, num_classes: 10}", "data: [{name: synthetic}, {name: digits}]")
        + "batch_size: [1, 2]\nprecision: [fp32, bf16-mixed]\nseed: [0, 1, 2]\n"
        + "tuners:\n  - tuner: lora\n    grid: {rank: [1, 2], dropout: [0.0, 0.1, 0.2]}\n  - tuner: linear\n"
    )
    suite = load_suite(path)
    assert count_runs(suite) == len(expand(suite, "cpu")) == 2 * (6 + 1) * 2 * 2 * 3


def test_runs_table_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "product.yaml"
    path.write_text(HEAD + f"seed: {list(range(100))}\ntuners: [{{tuner: linear}}]\n")
    result = CliRunner().invoke(app, ["validate", str(path), "--no-preflight"])
    assert result.exit_code == 0, result.output
    run_rows = [line for line in result.output.splitlines() if line.startswith("│") and "linear" in line]
    assert len(run_rows) == RUNS_HEAD + RUNS_TAIL
    assert f"{100 - RUNS_HEAD - RUNS_TAIL} more runs" in result.output
    assert "100 runs, 60 not shown" in " ".join(result.output.split())
    numbers = [int(line.split("│")[1]) for line in run_rows]
    assert numbers == [*range(1, RUNS_HEAD + 1), *range(101 - RUNS_TAIL, 101)]


def test_error_lines_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(HEAD + "tuners: [{tuner: lora}]\n" + "".join(f"typo{i}: 1\n" for i in range(25)))
    lines = _errors(["validate", str(path), "--no-preflight"])
    assert len(lines) == MAX_PROBLEM_LINES + 1
    assert all(f"{path}: typo" in line and "unknown key" in line for line in lines[:-1])
    assert lines[-1].startswith("error: ... 15 more problems")
