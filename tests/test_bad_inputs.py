"""The bad-input promise, replayed: every file under tests/bad_inputs/ (and a few generated at test time) makes
`validate`, `run`, `check` and `report` exit 2 with a few lines naming the file (and the field), no traceback, and
a results folder that already holds a good row stays byte-identical.

Add a case: drop the file in tests/bad_inputs/<kind>/ and list it below with the text its error must contain.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.spec.models import SCHEMA_VERSION
from tests.report_rows import MiB, row, write

CORPUS = Path(__file__).parent / "bad_inputs"
MAX_ERROR_LINES = 11  # the console's cap (10) plus its '... N more problems' line


@dataclass(frozen=True)
class Case:
    name: str  # file under tests/bad_inputs/, or a generated case
    expect: str  # text the error must contain (the field, or what is wrong)
    kind: str = "suites"  # suites | budgets | results
    slow: bool = False  # needs the probe child: replayed through `validate` only


SUITES = [
    Case("typo_key.yaml", "tunres: unknown key"),
    Case("unknown_tuner.yaml", "tuners[0].tuner: unknown tuner 'lroa'; did you mean 'lora'?"),
    Case("unknown_knob.yaml", "tuners[0].params.rnak: unknown knob"),
    Case("missing_data.yaml", "data: Field required"),
    Case("unknown_dataset.yaml", "data.name: unknown value 'imagenet'"),
    Case("missing_dataset_root.yaml", "data (vtab1k/dtd)"),
    Case("inf_timeout.yaml", "timeout_s: must be a finite number"),
    Case("nan_lr.yaml", "optimizer.lr: must be a finite number"),
    Case("huge_float.yaml", "tuners[0].params.alpha: must be a finite number"),
    Case("negative_batch.yaml", "batch_size: must be > 0"),
    Case("bool_rank.yaml", "tuners[0].params.rank: must be a number, not a boolean"),
    Case("bool_batch.yaml", "batch_size: must be a number, not a boolean"),
    Case("bool_in_grid.yaml", "tuners[0].grid.rank: must be a number, not a boolean"),
    Case("string_lr.yaml", "optimizer.lr: Input should be a valid number"),
    Case("string_batch.yaml", "batch_size: must be a positive integer"),
    Case("bad_precision.yaml", "precision"),
    Case("bad_device.yaml", "device: Input should be 'auto', 'cpu' or 'cuda'"),
    Case("empty_tuners.yaml", "tuners: List should have at least 1 item"),
    Case("empty_grid.yaml", "tuners[0].grid.rank: empty list"),
    Case("grid_and_params.yaml", "tuners[0].grid.rank: also set in params"),
    Case("duplicate_run.yaml", "tuners[1]: repeats a run of tuners[0]"),
    Case("bad_name.yaml", "name: String should match pattern"),
    Case("reserved_kwarg.yaml", "backbone.kwargs: set num_classes as backbone fields"),
    Case("task_params_unknown_task.yaml", "tuners[0].task_params.dtd: no dataset of this suite is task 'dtd'"),
    Case("missing_weights.yaml", "backbone.weights: /nonexistent/vit.pth: no such checkpoint file"),
    Case("tabs.yaml", "indent with spaces, not tabs"),
    Case("duplicate_keys.yaml", "duplicate key 'batch_size'"),
    Case("python_tag.yaml", "could not determine a constructor for the tag"),
    Case("unhashable_key.yaml", "found unhashable key"),
    Case("empty.yaml", "empty file"),
    Case("comment_only.yaml", "empty file"),
    Case("toplevel_list.yaml", "top level must be a mapping of fields, got a list"),
    Case("toplevel_scalar.yaml", "top level must be a mapping of fields, got a string"),
    Case("alias_bomb.yaml", "more than 100,000 values once YAML aliases are expanded"),
    Case("deep_flow.yaml", "nested deeper than 50 levels"),
    Case("bom_typo.yaml", "tunres: unknown key"),
    Case("latin1.yaml", "not UTF-8 text"),
    Case("nul_byte.yaml", "character #x0000 at position"),
    Case("binary_junk.yaml", "not UTF-8 text"),
    Case("long_string.yaml", "name: String should match pattern"),
    Case("many_errors.yaml", "typo_1: unknown key"),
    Case("too_many_runs.yaml", "expands to 1,000,000 runs, more than the 100,000"),
    Case("probe_unknown_kwarg.yaml", "backbone.kwargs.bogus_arg: 'test_vit' does not take 'bogus_arg'", slow=True),
    # generated below (too big to commit, or not a file)
    Case("<deep_block>", "nested deeper than 50 levels"),
    Case("<huge_file>", "larger than the 10 MB a suite or budgets file may be"),
    Case("<missing_file>", "no such file"),
    Case("<directory>", "is a directory"),
    Case("<unreadable>", "cannot read (Permission denied)"),
]
BUDGETS = [
    Case("typo_key.yaml", "budget: unknown key", "budgets"),
    Case("inf_limit.yaml", "budgets[0].max_params_trainable: must be a finite number", "budgets"),
    Case("bool_limit.yaml", "budgets[0].max_params_trainable: must be a number, not a boolean", "budgets"),
    Case("bad_unit.yaml", "budgets[0].max_peak_allocated_bytes", "budgets"),
    Case("selects_nothing.yaml", "budgets[0]", "budgets"),
    Case("negative_ratio.yaml", "ratios[0].max_ratio", "budgets"),
    Case("empty.yaml", "empty file", "budgets"),
    Case("toplevel_list.yaml", "top level must be a mapping of fields, got a list", "budgets"),
    Case("deep.yaml", "nested deeper than 50 levels", "budgets"),
    Case("tabs.yaml", "indent with spaces, not tabs", "budgets"),
]
RESULTS = [
    Case("corrupt.parquet", "unreadable results file", "results"),
    Case("<foreign>", "not a petlbench results file (no run_id, schema_version, suite, status column)", "results"),
    Case("<newer_schema>", f"newer than this petlbench ({SCHEMA_VERSION})", "results"),
    Case("<schema_not_a_number>", "schema_version is not a number", "results"),
    Case("<truncated>", "unreadable results file", "results"),
]

GOOD_BUDGETS = "budgets:\n  - select: {tuner: lora}\n    max_params_trainable: 100000\n"


def _generate(name: str, tmp: Path) -> Path:
    """The cases that are not committed files."""
    if name == "<deep_block>":
        path = tmp / "deep_block.yaml"
        path.write_text("name: bad\ntuners:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(500)))
    elif name == "<huge_file>":
        path = tmp / "huge.yaml"
        path.write_text("name: bad\ndescription: " + "x" * (11 * 1024**2) + "\n")
    elif name == "<missing_file>":
        path = tmp / "nope" / "missing.yaml"
    elif name == "<directory>":
        path = tmp / "a_folder.yaml"
        path.mkdir()
    elif name == "<unreadable>":
        path = tmp / "unreadable.yaml"
        path.write_text("name: bad\n")
        path.chmod(0)
    else:
        raise AssertionError(name)
    return path


def _bad_results(name: str, folder: Path) -> Path:
    """A bad file beside the good row."""
    good = next(folder.glob("*.parquet"))
    path = folder / "bad.parquet"
    if name == "<foreign>":
        pd.DataFrame({"item": ["apple"], "price": [1.5]}).to_parquet(path, index=False)
    elif name == "<newer_schema>":
        write([row("lora", 16, knob=8, device="cpu", suite="good", schema_version=SCHEMA_VERSION + 1)], folder)
        path = max(folder.glob("*-16-*.parquet"))
    elif name == "<schema_not_a_number>":
        write([row("lora", 16, knob=8, device="cpu", suite="good", schema_version="one")], folder)
        path = max(folder.glob("*-16-*.parquet"))
    elif name == "<truncated>":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes((CORPUS / "results" / name).read_bytes())
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every results file's bytes (a run's lock file is not a result: it only names the last holder)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def good_results(tmp_path: Path) -> Path:
    """results/good/ with one ok row, and the budgets that select it."""
    write([row("lora", 8, knob=8, device="cpu", peak=10 * MiB, suite="good")], tmp_path / "results" / "good")
    (tmp_path / "good-budgets.yaml").write_text(GOOD_BUDGETS)
    return tmp_path / "results"


def _assert_refused(output: str, stderr: str, file: Path, expect: str) -> None:
    assert "Traceback" not in output, output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= MAX_ERROR_LINES, stderr
    assert all(len(line) < 600 for line in lines), "an error line must stay readable"
    assert str(file) in lines[0], stderr  # names the file
    assert expect in stderr, stderr


def _invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output, result.stderr


def _suite_commands(path: Path, results: Path) -> list[list[str]]:
    return [
        ["validate", str(path), "--results-dir", str(results)],
        ["run", str(path), "--results-dir", str(results)],
    ]


@pytest.mark.parametrize("case", SUITES, ids=lambda c: c.name)
def test_bad_suite(case: Case, tmp_path: Path, good_results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _generate(case.name, tmp_path) if case.name.startswith("<") else CORPUS / "suites" / case.name
    if case.name == "<unreadable>":  # root reads any file: make the read itself fail as it would for a user
        original = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    before = _snapshot(good_results)
    commands = _suite_commands(path, good_results)
    for args in commands[:1] if case.slow else commands:
        code, output, stderr = _invoke(args)
        assert code == 2, (args, output)
        _assert_refused(output, stderr, path, case.expect)
    assert _snapshot(good_results) == before


@pytest.mark.parametrize("case", BUDGETS, ids=lambda c: c.name)
def test_bad_budgets(case: Case, good_results: Path) -> None:
    path = CORPUS / "budgets" / case.name
    before = _snapshot(good_results)
    code, output, stderr = _invoke(["check", "--budgets", str(path), str(good_results)])
    assert code == 2, output
    _assert_refused(output, stderr, path, case.expect)
    assert _snapshot(good_results) == before


@pytest.mark.parametrize("case", RESULTS, ids=lambda c: c.name)
def test_bad_results(case: Case, tmp_path: Path, good_results: Path) -> None:
    bad = _bad_results(case.name, good_results / "good")
    before = _snapshot(good_results)
    suite = tmp_path / "good.yaml"  # `run` plans against the same folder: it must refuse too, before any worker
    suite.write_text(
        "name: good\ndevice: cpu\ndata: {name: synthetic, num_classes: 10}\nbatch_size: 2\n"
        "backbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 1}}\ntuners: [{tuner: linear}]\n"
    )
    commands: list[list[str]] = [
        ["report", str(good_results), "--out", str(tmp_path / "reports"), "--plot", "pareto"],
        ["check", "--budgets", str(tmp_path / "good-budgets.yaml"), str(good_results)],
        ["run", str(suite), "--results-dir", str(good_results), "--no-preflight"],
    ]
    for args in commands:
        code, output, stderr = _invoke(args)
        assert code == 2, (args, output)
        _assert_refused(output, stderr, bad, case.expect)
    assert _snapshot(good_results) == before


@pytest.mark.parametrize(
    ("name", "expect"),
    [("deep_flow.yaml", "nested deeper than 50 levels"), ("alias_bomb.yaml", "YAML aliases are expanded")],
)
def test_a_real_process_exits_2_with_one_line(name: str, expect: str) -> None:
    """The same promise outside CliRunner: the installed entry point, its own stderr, its exit status."""
    path = CORPUS / "suites" / name
    done = subprocess.run(
        [sys.executable, "-m", "petlbench", "validate", str(path), "--no-preflight"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr and expect in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_corpus_is_all_listed() -> None:
    """A file dropped into tests/bad_inputs/ without a case would silently test nothing."""
    listed = {(c.kind, c.name) for c in [*SUITES, *BUDGETS, *RESULTS] if not c.name.startswith("<")}
    present = {(p.parent.name, p.name) for p in CORPUS.glob("*/*") if p.is_file()}
    assert present == listed
    assert len(SUITES) + len(BUDGETS) + len(RESULTS) >= 40
