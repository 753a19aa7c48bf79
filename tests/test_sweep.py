"""End to end through the CLI: one subprocess per run, failures isolated, resume, --force, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.results import load_results
from tests.test_parallel import workers_with

ROOT = Path(__file__).resolve().parents[1]
TINY = """\
name: {name}
device: cpu
data: {{name: synthetic, num_classes: 10}}
backbone: {{model: test_vit, img_size: 32, kwargs: {{patch_size: 8, depth: 3}}}}
batch_size: 8
measure: {{warmup_steps: 2, steps: 2}}
timeout_s: {timeout}
tuners:
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_PLUGINS", "tests.plugins.fault_tuners")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def write_suite(tmp_path: Path, name: str, tuners: list[str], timeout: int = 120) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name, timeout=timeout) + "".join(f"  - tuner: {t}\n" for t in tuners))
    return path


def test_crash_oom_and_timeout_each_become_one_row(tmp_path: Path, plugin_env: None) -> None:
    suite = write_suite(tmp_path, "faults", ["linear", "test_crash", "test_oom", "test_hang"], timeout=15)
    results = tmp_path / "results"
    outcome = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert outcome.exit_code == 0, outcome.output
    frame = load_results([results])
    assert len(frame) == 4 and frame["run_id"].is_unique
    rows = frame.set_index("tuner")
    assert rows.loc["linear", "status"] == "ok"
    assert rows.loc["test_crash", "status"] == "error"
    assert "exited with code 17" in rows.loc["test_crash", "error"]
    assert "about to die" in rows.loc["test_crash", "error"]  # the log tail travels with the row
    assert rows.loc["test_oom", "status"] == "oom"
    assert "out of memory at batch size 8" in rows.loc["test_oom", "error"]
    assert rows.loc["test_hang", "status"] == "timeout"
    assert "timeout of 15 s" in rows.loc["test_hang", "error"]


def test_failed_runs_are_retried_and_strict_exits_1(tmp_path: Path, plugin_env: None) -> None:
    suite = write_suite(tmp_path, "strict", ["test_crash", "test_oom"])
    results = tmp_path / "results"
    first = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert first.exit_code == 0, first.output
    # an oom is a result (that batch does not fit) and is kept; a crash is retried on the next run
    strict = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results), "--strict"])
    assert strict.exit_code == 1, strict.output
    assert "1 done, 1 to run, 1 retried" in strict.output


def test_rerun_runs_nothing_and_force_reruns_identically(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "rerun", ["linear"])
    results = tmp_path / "results"
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert first.exit_code == 0, first.output
    peak = load_results([results])["peak_allocated_bytes"].item()
    again = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert again.exit_code == 0 and "nothing to run" in again.output
    forced = runner.invoke(app, ["run", str(suite), "--results-dir", str(results), "--force"])
    assert forced.exit_code == 0 and "ok: 1" in forced.output
    frame = load_results([results])
    assert len(frame) == 1
    assert frame["peak_allocated_bytes"].item() == peak  # fresh process, same spec: same bytes


def test_ctrl_c_keeps_finished_runs_and_stops_the_worker(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "interrupt", ["linear", "test_hang"], timeout=300)
    results = tmp_path / "results"
    marker = uuid.uuid4().hex  # finds this test's workers, not those of other sweeps on the machine
    env = {
        **os.environ,
        "PETLBENCH_PLUGINS": "tests.plugins.fault_tuners",
        "PETLBENCH_TEST_MARKER": marker,
        "PYTHONPATH": str(ROOT),
    }
    parent = subprocess.Popen(
        [sys.executable, "-m", "petlbench", "run", str(suite), "--results-dir", str(results)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((results / "interrupt").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # the hanging run has started
    parent.send_signal(signal.SIGINT)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 130, stderr
    assert "run the same command to resume" in stderr
    frame = load_results([results])
    assert list(frame["tuner"]) == ["linear"] and list(frame["status"]) == ["ok"]
    assert not workers_with(marker), "worker survived the interrupt"
