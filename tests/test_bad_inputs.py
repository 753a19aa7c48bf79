"""The bad-input promise, replayed: every file under tests/bad_inputs/ (and a few generated at test time) makes
`validate`, `run`, `check` and `report` exit 2 with a few lines naming the file (and the field), no traceback, and
a results folder that already holds a good row stays byte-identical.

Add a case: drop the file in tests/bad_inputs/<kind>/ and list it below with the text its error must contain.
"""

from __future__ import annotations

import os
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
TYPED = {  # a column of the catalogue written with another type (petlbench.columns)
    "<created_at_int>": (
        {"created_at": 1_700_000_000},
        "column created_at holds integers, where petlbench writes text",
    ),
    "<status_int>": ({"status": 1}, "column status holds integers, where petlbench writes text"),
    "<batch_size_str>": ({"batch_size": "eight"}, "column batch_size holds text, where petlbench writes integers"),
    "<list_cell>": ({"knob": [8, 16]}, "column knob holds lists; a result cell is a single value"),
}
RESULTS = [
    *(Case(name, expect, "results") for name, (_, expect) in TYPED.items()),
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
    if name in TYPED:
        return _typed_results(name, folder)
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


# --- hostile inputs found by fault injection: one line, exit 2, never a traceback -----------------------------------


def _one_line(code: int, output: str, stderr: str, *expect: str) -> str:
    assert code == 2, output
    assert "Traceback" not in output and "Aborted" not in output, output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for text in expect:
        assert text in lines[0], stderr
    return lines[0]


TINY_SUITE = (
    "name: good\ndevice: cpu\ndata: {name: synthetic, num_classes: 10}\nbatch_size: [2, 4]\n"
    "backbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 1}}\ntuners: [{tuner: linear}]\n"
)

PLUGINS = {
    "raises": ("raise RuntimeError('plugin broke')\n", "RuntimeError: plugin broke"),
    "syntax": ("def broken(:\n", "syntax error"),
    "exits": ("import sys\nsys.exit(3)\n", "sys.exit(3)"),
    "bare_exception": ("raise ValueError\n", "ValueError"),
    "shadows": (
        "from petlbench.tuners.linear import Linear\n\nclass Mine(Linear):\n    name = 'lora'\n\nTUNERS = [Mine]\n",
        "registers tuner 'lora'",
    ),
}


@pytest.mark.parametrize("case", [*PLUGINS, "relative"])
def test_a_plugin_that_fails_at_import_is_one_line(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception, a syntax error, sys.exit or a built-in's name in PETLBENCH_PLUGINS: one line naming the variable
    and the module, for `tuners` and `validate`."""
    module = f"plugin_{case}_{tmp_path.name}".replace("-", "_")
    if case == "relative":
        name, expect = f".{module}", "relative module name"
    else:
        source, expect = PLUGINS[case]
        (tmp_path / f"{module}.py").write_text(source)
        name = module
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PETLBENCH_PLUGINS", name)
    suite = tmp_path / "good.yaml"
    suite.write_text(TINY_SUITE)
    for args in (["tuners"], ["validate", str(suite), "--no-preflight"]):
        line = _one_line(*_invoke(args), "PETLBENCH_PLUGINS", name, expect)
        assert "delete it" not in line


def _timeline_results(tmp_path: Path) -> tuple[Path, Path, str]:
    """results/good/ with one ok row and its stored timeline; (results folder, timeline file, run_id)."""
    from petlbench.why import CATEGORIES, WhyData, WhyEntry, save_why, why_path

    folder = tmp_path / "results" / "good"
    write([row("lora", 8, knob=8, device="cpu", peak=10 * MiB, suite="good", run_id="abc123def456")], folder)
    entries = [
        WhyEntry(module="blocks.0.mlp.fc1", category="activations", bytes=40_000, tensors=2),
        WhyEntry(module="blocks.0.attn.qkv", category="activations", bytes=30_000, tensors=1),
        WhyEntry(module="", category="weights", bytes=50_000, tensors=5),
    ]
    live = {c: [0, 0, 0] for c in CATEGORIES}
    live["weights"], live["activations"] = [50_000, 50_000, 50_000], [0, 70_000, 0]
    why = WhyData(
        round_to=1,
        events=10,
        x=[0, 5, 9],
        live=live,
        phases=[("forward", 0), ("backward", 5), ("optimizer", 8)],
        peak_bytes=120_000,
        peak_event=5,
        entries=entries,
    )
    return tmp_path / "results", save_why(why_path(folder, "abc123def456"), why), "abc123def456"


def _hostile_timeline(case: str, path: Path) -> None:
    import zipfile

    import numpy as np

    good = path.read_bytes()
    path.unlink()
    if case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "directory":
        path.mkdir()
    elif case in ("missing_key", "mismatched", "object_array"):
        with np.load(_keep(good, path.with_suffix(".keep")), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        if case == "missing_key":
            del arrays["live"]
        elif case == "mismatched":
            arrays["entry_bytes"] = arrays["entry_bytes"][:1]
        else:
            arrays["entry_module"] = np.array([{"not": "a string"}, 1, None], dtype=object)
        with open(path, "wb") as handle:
            np.savez(handle, allow_pickle=True, **arrays)
        path.with_suffix(".keep").unlink()
    elif case == "zip_bomb":  # a few hundred kB on disk, 300 MiB once inflated
        zeros = bytes(1 << 20)
        with (
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
            archive.open("live.npy", "w", force_zip64=True) as member,
        ):
            for _ in range(300):
                member.write(zeros)
    else:
        raise AssertionError(case)


def _keep(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


TIMELINE_CASES = ["truncated", "empty", "random", "directory", "missing_key", "mismatched", "object_array", "zip_bomb"]


@pytest.mark.parametrize("case", TIMELINE_CASES)
def test_a_hostile_timeline_file_is_one_line(case: str, tmp_path: Path) -> None:
    """`explain` and `report` read timelines/*.npz: bounded size, no pickle, every array checked."""
    results, timeline, run_id = _timeline_results(tmp_path)
    _hostile_timeline(case, timeline)
    commands = [
        ["explain", str(results), "--run", run_id],
        ["report", str(results), "--out", str(tmp_path / "reports"), "--plot", "breakdown"],
    ]
    for args in commands:
        line = _one_line(*_invoke(args), str(timeline), "unreadable timeline")
        assert "delete it (the run's row stays)" in line  # the row is fine: only the timeline goes


def test_a_good_timeline_still_explains(tmp_path: Path) -> None:
    results, _, run_id = _timeline_results(tmp_path)
    code, output, _ = _invoke(["explain", str(results), "--run", run_id])
    assert code == 0, output
    assert "blocks.0.mlp.fc1" in output and "39.1 KiB" in output


def _typed_results(name: str, folder: Path) -> Path:
    values, _ = TYPED[name]
    record = row("lora", 16, knob=8, device="cpu", suite="good", run_id="badtyped0001")
    record.update(values)
    write([record], folder)
    return folder / "badtyped0001.parquet"


@pytest.mark.parametrize("name", list(TYPED))
def test_wrongly_typed_columns_are_refused_by_compare_and_explain(name: str, good_results: Path) -> None:
    bad = _typed_results(name, good_results / "good")
    for args in (["compare", str(good_results), str(good_results)], ["explain", str(good_results)]):
        _one_line(*_invoke(args), str(bad), TYPED[name][1])


NUMERIC_OPTIONS = [
    (["compare", "{r}", "{r}", "--max-increase", "nan"], "--max-increase: must be a finite number"),
    (["compare", "{r}", "{r}", "--max-increase", "inf"], "--max-increase: must be a finite number"),
    (["compare", "{r}", "{r}", "--max-increase", "-5"], "--max-increase: must be ≥ 0"),
    (["compare", "{r}", "{r}", "--top", "0"], "--top: must be ≥ 1"),
    (["check", "{r}", "--write-baseline", "{t}/b.yaml", "--headroom", "nan"], "--headroom: must be a finite number"),
    (["check", "{r}", "--write-baseline", "{t}/b.yaml", "--headroom", "inf"], "--headroom: must be a finite number"),
    (["explain", "{r}", "--top", "-3"], "--top: must be ≥ 1"),
    (["explain", "{r}", "--batch-size", "0"], "--batch-size: must be ≥ 1"),
    (["report", "{r}", "--out", "{t}/rep", "--batch-size", "-8"], "--batch-size: must be ≥ 1"),
    (["estimate", "{t}/good.yaml", "--jobs", "0"], "--jobs: must be ≥ 1"),
]


@pytest.mark.parametrize(("args", "expect"), NUMERIC_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_numeric_options_are_checked_like_suite_fields(
    args: list[str], expect: str, good_results: Path, tmp_path: Path
) -> None:
    """A NaN threshold passes everything, a negative --top drops rows: refused in one line before any work."""
    (tmp_path / "good.yaml").write_text(TINY_SUITE)
    before = _snapshot(good_results)
    filled = [a.format(r=good_results, t=tmp_path) for a in args]
    _one_line(*_invoke(filled), expect)
    assert _snapshot(good_results) == before and not (tmp_path / "b.yaml").exists()


def test_jobs_above_the_cores_are_capped_with_a_line(tmp_path: Path) -> None:
    from petlbench.executors.devices import available_cores

    suite = tmp_path / "good.yaml"
    suite.write_text(TINY_SUITE)
    args = ["run", str(suite), "--results-dir", str(tmp_path / "r"), "--dry-run", "--no-preflight", "--jobs", "10000"]
    code, output, stderr = _invoke(args)
    assert code == 0, output
    assert f"--jobs 10000: this machine runs {available_cores()} runs at once" in stderr


def test_estimate_into_an_unwritable_folder_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root can write a read-only folder: a file where `<suite>.estimate/` goes makes it unwritable for anyone."""
    import petlbench.run.predict as predict

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("estimated before checking that the rows can be stored")

    monkeypatch.setattr(predict, "probe_suite", no_work)
    monkeypatch.setattr(predict, "estimating", no_work)
    suite = tmp_path / "good.yaml"
    suite.write_text(TINY_SUITE)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "good.estimate").write_text("a file, not a folder")
    _one_line(*_invoke(["estimate", str(suite), "--results-dir", str(tmp_path / "results")]), "cannot write")


def test_a_path_with_a_newline_is_one_error_line(tmp_path: Path) -> None:
    weird = tmp_path / "res\nults"
    (tmp_path / "b.yaml").write_text(GOOD_BUDGETS)
    line = _one_line(*_invoke(["check", "--budgets", str(tmp_path / "b.yaml"), str(weird)]), "no such results")
    assert "res\\nults" in line
    _one_line(*_invoke(["validate", str(tmp_path / "a\nb.yaml")]), "a\\nb.yaml")


def test_a_results_path_the_filesystem_encoding_cannot_decode_is_read(tmp_path: Path) -> None:
    """Under LC_ALL=C a UTF-8 'é' in a path reaches Python as surrogate escapes (here: a Latin-1 byte, which no
    UTF-8 locale decodes either). Good rows must be read, never called unreadable."""
    plain = tmp_path / "plain"
    write([row("lora", 8, knob=8, device="cpu", peak=10 * MiB, suite="good")], plain / "good")
    weird = tmp_path / "r\udce9sults"  # the byte 0xe9, undecodable
    os.rename(plain, weird)
    (tmp_path / "b.yaml").write_text(GOOD_BUDGETS)
    code, output, _ = _invoke(["check", "--budgets", str(tmp_path / "b.yaml"), str(weird)])
    assert code == 0, output
    assert "unreadable" not in output and "delete it" not in output


@pytest.mark.parametrize("width", [1, 20])
@pytest.mark.parametrize("command", ["tuners", "explain"])
def test_narrow_terminals_keep_every_name_and_number(
    command: str, width: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from petlbench.cli.console import out
    from petlbench.tuners import TUNERS

    if command == "tuners":
        args = ["tuners"]
        wanted = [*TUNERS, "rank=8", "prompt_len=50", "num_queries=4"]
    else:
        results, _, run_id = _timeline_results(tmp_path)
        args = ["explain", str(results), "--run", run_id]
        wanted = ["blocks.0.mlp.fc1", "blocks.0.attn.qkv", "39.1 KiB", "29.3 KiB", "activation bytes"]
    monkeypatch.setattr(out, "_width", width)
    code, output, _ = _invoke(args)
    assert code == 0, output
    assert "…" not in output
    for text in wanted:
        assert text in output, (text, output)


def test_peft_checks_on_meta_and_refuses_absurd_sizes() -> None:
    """The probe and the estimator build peft on meta: nothing real is allocated (BOFT included), and a rank that
    would add billions of elements is a KnobError naming `r`, not an allocation failure."""
    import peft  # noqa: F401  (a dev dependency: its absence fails here rather than skipping)
    import torch

    from petlbench.backbone import build_backbone
    from petlbench.errors import KnobError
    from petlbench.spec.models import BackboneSpec
    from petlbench.tuners import make_tuner
    from petlbench.tuners.base import build_tuned_model

    spec = BackboneSpec(model="test_vit", img_size=32, kwargs={"patch_size": 8, "depth": 1})
    with torch.device("meta"):
        tuned = build_tuned_model(build_backbone(spec, 10), make_tuner("peft", {"peft_type": "BOFT"}))
    assert all(t.is_meta for t in [*tuned.module.parameters(), *tuned.module.buffers()])
    with torch.device("meta"), pytest.raises(KnobError) as caught:
        build_tuned_model(build_backbone(spec, 10), make_tuner("peft", {"peft_type": "LORA", "r": 1_000_000}))
    assert caught.value.field == "config.r" and "choose a smaller r" in caught.value.detail
