"""Process lifecycle: nothing lost, nothing orphaned (docs/guarantees.md).

A parent killed with -9 takes its workers with it; SIGTERM stops like Ctrl-C; a second run of a suite refuses;
an unwritable results folder stops the sweep with one line; the OOM killer's SIGKILL is an `oom` row; the fork
server measures what a fresh interpreter measures.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.errors import ResultsLocked, WriteError
from petlbench.executors.events import RunEvent, RunFinished, RunStarted
from petlbench.executors.forkclient import ForkServers
from petlbench.executors.local import run_in_subprocess
from petlbench.executors.process import TEMP_PREFIX, clean_stale_temp, killed_by_oom_killer, oom_kills
from petlbench.results import failed_result, load_results, results_lock
from petlbench.run.execute import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from tests.test_parallel import workers_with, write_suite

ROOT = Path(__file__).resolve().parents[1]


def tiny_specs(batch_sizes: list[int], tuner: str = "linear") -> list[RunSpec]:
    suite = parse_suite(
        {
            "name": "life",
            "device": "cpu",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": {"model": "test_vit", "img_size": 32, "kwargs": {"patch_size": 8, "depth": 3}},
            "batch_size": batch_sizes,
            "measure": {"warmup_steps": 2, "steps": 2},
            "tuners": [{"tuner": tuner}],
        }
    )
    return expand(suite, "cpu")


# --- the kernel OOM killer ----------------------------------------------------------------------------------------


def fake_cgroup(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_cgroup)
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return proc, root


def test_oom_kill_counter_is_read_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
    proc, root = fake_cgroup(tmp_path / "v2", "0::/user.slice/job\n", {"user.slice/job/memory.events": events})
    assert oom_kills(proc, root) == 2
    control = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"
    proc, root = fake_cgroup(tmp_path / "v1", "4:memory:/docker/abc\n0::/\n", {"memory/memory.oom_control": control})
    assert oom_kills(proc, root) == 7  # the container's own cgroup root (the path is the host's)
    proc, root = fake_cgroup(tmp_path / "none", "0::/x\n", {})
    assert oom_kills(proc, root) is None


def test_only_a_sigkill_while_the_counter_rose_is_an_oom_kill() -> None:
    assert killed_by_oom_killer(-signal.SIGKILL, 2, 3)
    assert not killed_by_oom_killer(-signal.SIGKILL, 2, 2)  # kill -9 by a person
    assert not killed_by_oom_killer(-signal.SIGSEGV, 2, 3)  # a crash while something else was OOM-killed
    assert not killed_by_oom_killer(-signal.SIGKILL, None, None)  # no cgroup information: an error, as before


def test_a_worker_killed_by_the_oom_killer_is_an_oom_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker dies by SIGKILL and the (fake) cgroup counter goes up meanwhile: status oom, not error."""
    import petlbench.executors.local as local

    counts = iter([5, 6])
    monkeypatch.setattr(local, "oom_kills", lambda: next(counts))
    spec = tiny_specs([8])[0]

    class Killed:
        pid = 0

        def wait(self, timeout: float | None) -> int:
            return -signal.SIGKILL

        def kill(self) -> None:
            pass

    monkeypatch.setattr(local, "_start_child", lambda *args: Killed())
    monkeypatch.setattr(local, "kill_pgid", lambda pid: None)  # no real process group to clean up
    result = run_in_subprocess(spec, tmp_path)
    assert result.status == "oom" and "OOM killer" in (result.error or "")


# --- temp folders ---------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_dead_owners_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{TEMP_PREFIX}{dead_pid()}-abc"
    mine = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def"
    other = tmp_path / "petlbench-run-notapid"
    for folder in (stale, mine, other):
        (folder / "sub").mkdir(parents=True)
    assert clean_stale_temp(TEMP_PREFIX, tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and other.exists()


# --- writes that fail -----------------------------------------------------------------------------------------------


class FakeExecutor:
    """Yields a finished (skipped) row per spec; records whether it was closed (what kills a real executor's
    workers)."""

    def __init__(self) -> None:
        self.closed = False
        self.yielded = 0

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        try:
            for spec in specs:
                yield RunStarted(spec)
                self.yielded += 1
                yield RunFinished(failed_result(spec, "skipped", "fake"))
        finally:
            self.closed = True


def test_a_full_disk_stops_the_sweep_keeps_rows_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pd.DataFrame.to_parquet
    writes = 0

    def to_parquet(self: pd.DataFrame, path: Path, **kwargs: object) -> None:
        nonlocal writes
        writes += 1
        real(self, path, **kwargs)  # type: ignore[call-overload]
        if writes == 3:  # the third row: half written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    executor = FakeExecutor()
    with pytest.raises(WriteError) as caught:
        list(execute(tiny_specs([1, 2, 3, 4, 5]), executor, tmp_path))
    message = str(caught.value)
    assert str(tmp_path / "life") in message and "No space left on device" in message and "\n" not in message
    assert executor.closed and executor.yielded == 3  # stopped at once: no fourth run
    folder = tmp_path / "life"
    assert len(list(folder.glob("*.parquet"))) == 2  # the rows before stay
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_results_dir_that_is_a_file_exits_2_before_any_run(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "w", ["tuner: linear"])
    results = tmp_path / "results"
    results.write_text("not a folder")
    outcome = CliRunner().invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert outcome.exit_code == 2, outcome.output
    assert "cannot write results" in outcome.output and str(results) in outcome.output
    assert "Traceback" not in outcome.output and not (tmp_path / "w").exists()


def test_report_out_that_is_a_file_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "report-out"
    out.write_text("a file")
    outcome = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(out)])
    assert outcome.exit_code == 2, outcome.output
    assert "cannot write the report" in outcome.output and "Traceback" not in outcome.output


# --- one sweep per results folder -----------------------------------------------------------------------------------


def test_a_held_results_folder_refuses_a_second_holder(tmp_path: Path) -> None:
    held = results_lock(tmp_path / "s")
    held.__enter__()
    try:
        with pytest.raises(ResultsLocked, match=f"PID {os.getpid()}"), results_lock(tmp_path / "s"):
            pass
    finally:
        held.__exit__(None, None, None)
    with results_lock(tmp_path / "s"):  # released: free again
        pass


# --- real sweeps, killed --------------------------------------------------------------------------------------------


def start_run(suite: Path, results: Path, marker: str, tmpdir: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PETLBENCH_PLUGINS": "tests.plugins.fault_tuners",
        "PETLBENCH_TEST_MARKER": marker,
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmpdir),
    }
    command = [sys.executable, "-m", "petlbench", "run", str(suite), "--results-dir", str(results)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: object, parent: subprocess.Popen[str], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline and parent.poll() is None, what
        time.sleep(0.3)


def gone_within(marker: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while workers_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_kill_9_of_the_parent_takes_its_worker_and_the_next_run_removes_its_temp_folder(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "orphan", ["tuner: test_hang"], timeout=300)
    marker, tmpdir = uuid.uuid4().hex, tmp_path / "tmp"
    tmpdir.mkdir()
    parent = start_run(suite, tmp_path / "results", marker, tmpdir)
    wait_for(lambda: workers_with(marker), parent, "the hanging run never started")
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert gone_within(marker, 5), "a worker outlived its parent killed with -9"
    left = list(tmpdir.glob(f"{TEMP_PREFIX}{parent.pid}-*"))
    assert left  # what the dead parent could not clean up ...
    clean_stale_temp(TEMP_PREFIX, tmpdir)  # ... the next run's executor removes first
    assert not list(tmpdir.glob(f"{TEMP_PREFIX}{parent.pid}-*"))


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_a_second_run_of_the_suite_refuses(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "term", ["tuner: linear", "tuner: test_hang"], timeout=300)
    results, marker, tmpdir = tmp_path / "results", uuid.uuid4().hex, tmp_path / "tmp"
    tmpdir.mkdir()
    parent = start_run(suite, results, marker, tmpdir)
    wait_for(
        lambda: list((results / "term").glob("*.parquet")) and workers_with(marker), parent, "the hang never started"
    )
    second = subprocess.run(
        [sys.executable, "-m", "petlbench", "run", str(suite), "--results-dir", str(results)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "PETLBENCH_PLUGINS": "tests.plugins.fault_tuners"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stderr
    assert f"PID {parent.pid}" in second.stderr and "Traceback" not in second.stderr
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 143, stderr
    assert "1 runs finished in this session" in stderr
    frame = load_results([results])
    assert list(frame["tuner"]) == ["linear"] and list(frame["status"]) == ["ok"]
    assert gone_within(marker, 5), "a worker survived SIGTERM"
    assert not list(tmpdir.glob(f"{TEMP_PREFIX}*"))  # a clean stop leaves no temp folder


# --- the fork server ------------------------------------------------------------------------------------------------

MEMORY = ["peak_allocated_bytes", "peak_infer_bytes", "mem_weights_bytes", "mem_grads_bytes"]
MEMORY += ["mem_optimizer_bytes", "mem_activations_bytes", "params_trainable"]


@pytest.mark.slow
def test_forked_and_spawned_workers_measure_the_same_memory(tmp_path: Path) -> None:
    spec = tiny_specs([8], "lora")[0]
    spawned = run_in_subprocess(spec, tmp_path / "spawn")
    servers = ForkServers({**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        forked = run_in_subprocess(spec, tmp_path / "fork", servers=servers)
        again = run_in_subprocess(spec, tmp_path / "fork", servers=servers)  # the same server, a fresh child
    finally:
        servers.close()
    assert spawned.status == forked.status == again.status == "ok", (spawned.error, forked.error)
    log = (tmp_path / "fork" / spec.suite / "logs" / f"{spec.run_id}.log").read_text()
    assert "forked from the fork server" in log  # it really ran in a forked child, and its log was captured
    for column in MEMORY:
        values = {getattr(r.metrics, column) for r in (spawned, forked, again)}
        assert len(values) == 1 and None not in values, (column, values)
    assert spawned.env["torch_threads"] == forked.env["torch_threads"]
