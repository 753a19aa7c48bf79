"""Parallel local execution through the CLI: same rows as one at a time, failures isolated, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.executors.devices import threads_per_run
from petlbench.results import load_results

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "suites" / "smoke.yaml")
# Like suites/smoke.yaml (same tiny ViT, synthetic data, AdamW), with fewer runs and steps to keep CI short.
TINY = """\
name: {name}
device: cpu
data: {{name: synthetic, num_classes: 10}}
backbone: {{model: test_vit, img_size: 32, kwargs: {{patch_size: 8, depth: 3}}}}
batch_size: {batch_sizes}
measure: {{warmup_steps: 2, steps: 2}}
timeout_s: {timeout}
tuners:
"""
SAME = ["run_id", "status", "params_trainable", "peak_allocated_bytes", "peak_infer_bytes", "mem_weights_bytes"]
SAME += ["mem_grads_bytes", "mem_optimizer_bytes", "mem_activations_bytes"]


def write_suite(tmp_path: Path, name: str, tuners: list[str], batch_sizes: str = "8", timeout: int = 120) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = TINY.format(name=name, batch_sizes=batch_sizes, timeout=timeout)
    path.write_text(text + "".join(f"  - {t}\n" for t in tuners))
    return path


def plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_PLUGINS", "tests.plugins.fault_tuners")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def workers_with(marker: str) -> list[int]:
    """Pids of live petlbench workers whose environment carries `marker` (not other people's workers): spawned
    (`python -m petlbench.run.worker`) or forked by the fork server (named `petlbench-run`). Zombies do not count."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ, cmdline = (proc / "environ").read_bytes(), (proc / "cmdline").read_bytes()
            comm, stat = (proc / "comm").read_text().strip(), (proc / "stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] in {"Z", "X"}:
            continue
        worker = b"petlbench.run.worker" in cmdline or (
            b"petlbench.run.forkserver" in cmdline and comm == "petlbench-run"
        )
        if worker and f"PETLBENCH_TEST_MARKER={marker}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_jobs_usage_errors_exit_2(tmp_path: Path) -> None:
    for args, message in [
        (["--jobs", "0"], "--jobs: must be ≥ 1, got 0"),
        (["--address", "auto"], "--address: only used with --executor ray"),
    ]:
        outcome = CliRunner().invoke(app, ["run", SMOKE, "--results-dir", str(tmp_path), *args])
        assert outcome.exit_code == 2, outcome.output
        errors = [line for line in outcome.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {message}"]
    assert not list(tmp_path.rglob("*.parquet"))


def test_dry_run_shows_the_parallelism(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["run", SMOKE, "--dry-run", "-j", "2", "--results-dir", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    assert "to run) · local, 2 runs at a time" in outcome.output


@pytest.mark.slow
def test_two_jobs_give_the_same_rows_as_one(tmp_path: Path) -> None:
    # three runs (an odd count, so one job gets two), kept small: each worker run costs seconds on a loaded CPU
    tuners = ["tuner: full", "tuner: linear", "{tuner: lora, params: {rank: 4}}"]
    suite = write_suite(tmp_path, "parallel", tuners)
    frames: dict[int, pd.DataFrame] = {}
    for jobs in (1, 2):
        results = tmp_path / f"results-{jobs}"
        outcome = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results), "--jobs", str(jobs)])
        assert outcome.exit_code == 0, outcome.output
        assert "ok: 3" in outcome.output
        frames[jobs] = load_results([results]).sort_values("run_id").reset_index(drop=True)
    assert len(frames[1]) == 3
    # CPU memory is tensor accounting: exact, so running two at a time must not change a byte
    pd.testing.assert_frame_equal(frames[1][SAME], frames[2][SAME])
    # each of the two children got its share of the cores
    assert set(frames[2]["env.torch_threads"]) == {threads_per_run(2)}


@pytest.mark.slow
def test_a_crash_among_parallel_runs_is_one_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin_env(monkeypatch)
    suite = write_suite(
        tmp_path, "isolation", ["tuner: linear", "tuner: test_crash", "{tuner: lora, params: {rank: 4}}"]
    )
    results = tmp_path / "results"
    outcome = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results), "--jobs", "2"])
    assert outcome.exit_code == 0, outcome.output
    frame = load_results([results]).set_index("tuner")
    assert sorted(frame["status"]) == ["error", "ok", "ok"]
    assert frame.loc["test_crash", "status"] == "error"
    assert "exited with code 17" in frame.loc["test_crash", "error"]
    assert "about to die" in frame.loc["test_crash", "error"]  # its own log, not a neighbour's


@pytest.mark.slow
def test_ctrl_c_stops_every_parallel_worker_and_keeps_finished_runs(tmp_path: Path) -> None:
    # batch 8 and 16 of each: the two linear runs finish, then both hanging runs are in flight together
    suite = write_suite(
        tmp_path, "interrupt", ["tuner: linear", "tuner: test_hang"], batch_sizes="[8, 16]", timeout=300
    )
    results = tmp_path / "results"
    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        "PETLBENCH_PLUGINS": "tests.plugins.fault_tuners",
        "PETLBENCH_TEST_MARKER": marker,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "petlbench", "run", str(suite), "--results-dir", str(results), "--jobs", "2"]
    parent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(workers_with(marker)) < 2 or len(list((results / "interrupt").glob("*.parquet"))) < 2:
        assert time.monotonic() < deadline and parent.poll() is None, "the two hanging runs never ran together"
        time.sleep(0.5)
    assert len(workers_with(marker)) == 2
    parent.send_signal(signal.SIGINT)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 130, stderr
    assert "2 runs finished in this session" in stderr and "holds 2 results" in stderr
    frame = load_results([results])
    assert sorted(frame["tuner"]) == ["linear", "linear"] and set(frame["status"]) == {"ok"}
    assert not workers_with(marker), "a worker survived the interrupt"
