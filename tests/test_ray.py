"""The Ray executor on a local Ray instance (one per module: Ray takes seconds to start): same rows as local,
crash and timeout rows, logs on the driver, resume, and an interrupt that stops every worker."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.executors import RunStarted
from petlbench.executors.local import log_path
from petlbench.executors.ray import RayExecutor, forwarded_env
from petlbench.results import load_results
from petlbench.run.sweep import plan
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import RunSpec
from tests.test_parallel import SAME, SMOKE, plugin_env, workers_with, write_suite

RAY_CPUS = 2


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    import ray

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_without_ray_installed_run_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    outcome = CliRunner().invoke(app, ["run", SMOKE, "--executor", "ray", "--results-dir", str(tmp_path)])
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error:")]
    assert errors == ['error: --executor ray: Ray is not installed; pip install "petlbench[ray]"']
    assert not list(tmp_path.rglob("*.parquet"))


def test_forwarded_env_carries_plugins_and_pythonpath_only() -> None:
    environ = {"PYTHONPATH": "/src", "PETLBENCH_PLUGINS": "my.tuners", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "3"}
    assert forwarded_env(environ) == {"PYTHONPATH": "/src", "PETLBENCH_PLUGINS": "my.tuners"}


@pytest.mark.slow
def test_ray_gives_the_local_rows_and_turns_crashes_and_timeouts_into_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_instance: None
) -> None:
    plugin_env(monkeypatch)
    ok = ["tuner: linear", "{tuner: lora, params: {rank: 4}}"]
    # run_id excludes the suite name and timeout, so the two suites share the ok runs' ids
    local_suite = write_suite(tmp_path, "local", ok)
    ray_suite = write_suite(tmp_path, "cluster", [*ok, "tuner: test_crash", "tuner: test_hang"], timeout=15)
    local_results, ray_results = tmp_path / "local-results", tmp_path / "ray-results"

    local = CliRunner().invoke(app, ["run", str(local_suite), "--results-dir", str(local_results), "--jobs", "2"])
    assert local.exit_code == 0, local.output
    started = time.monotonic()
    remote = CliRunner().invoke(app, ["run", str(ray_suite), "--results-dir", str(ray_results), "--executor", "ray"])
    print(f"ray sweep of 4 runs: {time.monotonic() - started:.1f} s")
    assert remote.exit_code == 0, remote.output
    assert "· ray (local instance)" in remote.output

    frame = load_results([ray_results])
    assert len(frame) == 4 and frame["run_id"].is_unique
    rows = frame.set_index("tuner")
    assert rows.loc["test_crash", "status"] == "error"
    assert (
        "exited with code 17" in rows.loc["test_crash", "error"] and "about to die" in rows.loc["test_crash", "error"]
    )
    assert rows.loc["test_hang", "status"] == "timeout"
    assert "timeout of 15 s" in rows.loc["test_hang", "error"]
    # the worker logs came back from the Ray tasks and were written by the driver
    crash_spec = next(r for r in plan_specs(ray_suite) if r.tuner == "test_crash")
    assert "about to die" in log_path(ray_results, crash_spec).read_text()

    expected = load_results([local_results]).sort_values("run_id").reset_index(drop=True)
    got = frame[frame["status"] == "ok"].sort_values("run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(expected[SAME], got[SAME], check_dtype=False)  # error rows make columns object

    # resume: ok runs are kept, the crash and the timeout are retried
    again = CliRunner().invoke(
        app, ["run", str(ray_suite), "--results-dir", str(ray_results), "--executor", "ray", "--dry-run"]
    )
    assert again.exit_code == 0 and "(2 done, 2 to run, 2 retried)" in again.output


def plan_specs(suite: Path) -> list[RunSpec]:
    return expand(load_suite(suite), "cpu")


@pytest.mark.slow
def test_interrupt_cancels_queued_runs_and_kills_running_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_instance: None
) -> None:
    import ray

    plugin_env(monkeypatch)
    marker = uuid.uuid4().hex
    monkeypatch.setenv("PETLBENCH_TEST_MARKER", marker)  # PETLBENCH_* travels to the tasks and their workers
    # two hanging runs fill both Ray CPUs; the third waits in Ray's queue
    suite = write_suite(tmp_path, "interrupt", ["tuner: test_hang"], batch_sizes="[8, 16, 32]", timeout=300)
    specs = plan(plan_specs(suite), tmp_path / "results").todo
    events = RayExecutor(tmp_path / "results").execute(specs)
    submitted = [next(events) for _ in specs]
    assert all(isinstance(e, RunStarted) for e in submitted)
    deadline = time.monotonic() + 120
    while len(workers_with(marker)) < RAY_CPUS:
        assert time.monotonic() < deadline, "the hanging runs never started"
        time.sleep(0.5)
    # Ctrl-C while the driver waits for results: SIGINT to this process, whose handler raises KeyboardInterrupt
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        next(events)
    assert not workers_with(marker), "a worker survived the interrupt"
    assert ray.is_initialized()  # a Ray connection the executor did not open is left alone
    with pytest.raises(StopIteration):
        next(events)  # and the sweep is over: no result for runs that were stopped
