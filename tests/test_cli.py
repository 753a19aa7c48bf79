"""The command line as a user meets it: help, exit codes, one-line errors, and a torch-free parent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.tuners import TUNERS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "suites" / "smoke.yaml")
runner = CliRunner()


def test_tuners_lists_every_registered_tuner() -> None:
    result = runner.invoke(app, ["tuners"])
    assert result.exit_code == 0
    for name in TUNERS:
        assert name in result.output


def test_tuners_name_shows_one_tuner_in_full() -> None:
    result = runner.invoke(app, ["tuners", "lora"])
    assert result.exit_code == 0, result.output
    for knob in TUNERS["lora"].model_fields:
        assert knob in result.output
    assert "sqt" not in result.output
    typo = runner.invoke(app, ["tuners", "lroa"])
    assert typo.exit_code == 2 and "did you mean 'lora'?" in typo.output


def test_version() -> None:
    from petlbench import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"petlbench {__version__}"


SMOKE_RUNS = len(expand(load_suite(SMOKE), "cpu"))


def test_validate_prints_the_runs() -> None:
    result = runner.invoke(app, ["validate", SMOKE])
    assert result.exit_code == 0, result.output
    assert f"valid, {SMOKE_RUNS} runs" in result.output
    assert "vpt-deep" in result.output and "fact-tk" in result.output  # methods, not just registry names


def test_dry_run_runs_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", SMOKE, "--dry-run", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"0 done, {SMOKE_RUNS} to run" in result.output
    assert not list(tmp_path.rglob("*.parquet"))


def test_cuda_without_a_gpu_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", SMOKE, "--device", "cuda", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--device cpu" in errors[0]


def test_validate_needs_no_gpu_and_keeps_the_gpu_run_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from petlbench.spec.expand import expand
    from petlbench.spec.loading import load_suite

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU here, whatever the machine has
    result = runner.invoke(app, ["validate", "suites/gpu-small.yaml", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for run in expand(load_suite("suites/gpu-small.yaml"), "cuda"):  # what a GPU machine would run
        assert run.run_id in result.output


@pytest.mark.parametrize("args", [["validate", "missing.yaml"], ["run", "missing.yaml"]])
def test_missing_suite_exits_2(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "missing.yaml: no such file" in result.output


def test_python_dash_m_and_a_torch_free_parent() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from petlbench.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['validate', {SMOKE!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    result = subprocess.run([sys.executable, "-m", "petlbench", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "validate" in result.stdout
