"""Process lifecycle: nothing lost, nothing orphaned (docs/guarantees.md).

A parent killed with -9 takes its workers with it; SIGTERM stops like Ctrl-C; a second run of a suite refuses;
an unwritable results folder stops the sweep with one line; the OOM killer's SIGKILL is an `oom` row; the fork
server measures what a fresh interpreter measures.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.errors import ResultsLocked, WriteError
from petlbench.executors.events import RunEvent, RunFinished, RunStarted
from petlbench.executors.forkclient import ForkServers
from petlbench.executors.local import run_in_subprocess
from petlbench.executors.process import TEMP_PREFIX, clean_stale_temp, killed_by_oom_killer, oom_kills
from petlbench.results import failed_result, load_results, results_lock, write_result
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


# --- writes stay inside the results folder --------------------------------------------------------------------------


def outside(tmp_path: Path) -> Path:
    """A file outside the results folder that a symlink inside it points at."""
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir()
    target.write_text("keep me\n")
    return target


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    folder, target = tmp_path / "results" / "s", outside(tmp_path)
    folder.mkdir(parents=True)
    (folder / ".lock").symlink_to(target)
    with pytest.raises(WriteError, match="symbolic link"), results_lock(folder):
        pass
    os.unlink(folder / ".lock")
    os.link(target, folder / ".lock")  # a hard link: writing the PID would rewrite the target too
    with pytest.raises(WriteError, match="hard link"), results_lock(folder):
        pass
    assert target.read_text() == "keep me\n"


def test_a_worker_log_that_is_a_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    from petlbench.executors.local import _start_child

    target, log = outside(tmp_path), tmp_path / "logs" / "run.log"
    log.parent.mkdir()
    log.symlink_to(target)
    child = _start_child(tmp_path / "spec.json", tmp_path / "out.json", log, {}, "/bin/true", None)
    child.wait(60)
    assert target.read_text() == "keep me\n"
    assert log.is_file() and not log.is_symlink()


def test_a_linked_timelines_folder_is_refused_and_nothing_lands_outside(tmp_path: Path) -> None:
    from petlbench.why import TIMELINE_DIR, WhyData

    spec = tiny_specs([8])[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "results" / spec.suite).mkdir(parents=True)
    (tmp_path / "results" / spec.suite / TIMELINE_DIR).symlink_to(elsewhere, target_is_directory=True)
    why = WhyData(
        round_to=1,
        events=1,
        x=[0],
        live={c: [0] for c in ("weights", "gradients", "optimizer", "activations")},
        phases=[],
        peak_bytes=0,
        peak_event=0,
        entries=[],
    )
    result = failed_result(spec, "error", "x").model_copy(update={"why": why})
    with pytest.raises(WriteError, match="symbolic link"):
        write_result(tmp_path / "results", result)
    assert not list(elsewhere.iterdir())


def test_a_snapshot_target_that_is_a_link_is_replaced(tmp_path: Path) -> None:
    """A link to a folder at the snapshot's name: the snapshot replaces the link, it never moves into that folder."""
    from petlbench.executors.local import keep_snapshot
    from petlbench.why import SNAPSHOT_DIR

    spec, elsewhere = tiny_specs([8])[0], tmp_path / "elsewhere"
    elsewhere.mkdir()
    snapshot = tmp_path / "worker" / "snap.pickle"
    snapshot.parent.mkdir()
    snapshot.write_bytes(b"snapshot")
    folder = tmp_path / "results" / spec.suite / SNAPSHOT_DIR
    folder.mkdir(parents=True)
    (folder / f"{spec.run_id}.pickle").symlink_to(elsewhere, target_is_directory=True)
    result = failed_result(spec, "ok", "").model_copy(update={"snapshot_file": str(snapshot)})
    kept = Path(str(keep_snapshot(result, tmp_path / "results").snapshot_file))
    assert kept == folder / f"{spec.run_id}.pickle" and kept.read_bytes() == b"snapshot" and not kept.is_symlink()
    assert not list(elsewhere.iterdir())


def test_an_interrupted_figure_leaves_no_cut_file_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while matplotlib writes a PNG: the old figure stays, no half PNG takes its name, no temp file stays."""
    from matplotlib.figure import Figure

    from petlbench.report.views.view import ReportContext

    (tmp_path / "pareto-x.png").write_bytes(b"the previous figure")

    def interrupted(self: Figure, fname: object, **kwargs: object) -> None:
        with open(fname, "wb") if isinstance(fname, str | Path) else contextlib.nullcontext(fname) as handle:  # type: ignore[attr-defined]
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ReportContext.save(SimpleNamespace(out=tmp_path, figure_prefixes=("pareto",)), Figure(), "pareto-x")  # type: ignore[arg-type]
    assert (tmp_path / "pareto-x.png").read_bytes() == b"the previous figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto-x.png"]


# --- stdout that fails ----------------------------------------------------------------------------------------------


class ClosedPipe(io.StringIO):
    """A stdout whose reader went away after the first line (`petlbench run ... | head -1`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0

    def write(self, text: str) -> int:
        if self.lines >= 1:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        self.lines += text.count("\n")
        return super().write(text)

    def isatty(self) -> bool:
        return False


def test_a_closed_stdout_ends_the_output_not_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import petlbench.run.sweep as sweep_module
    from petlbench.cli.sweep_view import show_sweep
    from petlbench.run.sweep import SweepRequest

    suite = write_suite(tmp_path, "piped", ["tuner: linear"], batch_sizes="[1, 2, 3, 4]")
    monkeypatch.setattr(sweep_module, "make_executor", lambda *args, **kwargs: FakeExecutor())
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = show_sweep(SweepRequest(suite=suite, results_dir=tmp_path / "results", preflight=False))
    assert code == 0
    assert len(list((tmp_path / "results" / "piped").glob("*.parquet"))) == 4  # every run went on and was stored


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_one_line_and_exit_2(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "full", ["tuner: linear"])
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "petlbench",
                "run",
                str(suite),
                "--results-dir",
                str(tmp_path / "r"),
                "--dry-run",
                "--no-preflight",
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "No space left on device" in done.stderr and "Traceback" not in done.stderr


# --- children that outlive their parent -----------------------------------------------------------------------------

FAKE_SERVER = """\
import json, os, sys, time
os.write(1, b'{"ready": true}\\n')
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(float(request["args"][0]))
        os._exit(0)
    os.write(1, json.dumps({"pid": pid}).encode() + b"\\n")
    _, status = os.waitpid(pid, 0)
    os.write(1, json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\\n")
"""


def fake_python(tmp_path: Path) -> str:
    """An executable that ignores `-m petlbench...` and speaks the fork server's protocol (no torch: milliseconds)."""
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake_server.py'}\n")
    script.chmod(0o755)
    return str(script)


def test_a_stopped_fork_server_is_declared_dead_and_replaced(tmp_path: Path) -> None:
    """SIGSTOP the server while its run hangs: the run's timeout row comes on time (not 30 s or 300 s later), and
    the next run gets a new server."""
    from petlbench.executors.forkclient import REAP_TIMEOUT_S, WORKER, process_state

    servers = ForkServers(dict(os.environ), python=fake_python(tmp_path))
    try:
        with servers.lease() as server:
            assert server is not None and server.alive
            child = server.spawn(WORKER, ["60", "-"], tmp_path / "hang.log")
            assert child is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(subprocess.TimeoutExpired):
                child.wait(0.5)  # the run's timeout
            child.kill()
            assert child.wait(REAP_TIMEOUT_S) == -signal.SIGKILL
            assert time.monotonic() - start < 0.5 + REAP_TIMEOUT_S - 2
            assert not server.alive  # declared dead (and killed: SIGKILL reaches a stopped process)
        with servers.lease() as fresh:
            assert fresh is not None and fresh is not server
            quick = fresh.spawn(WORKER, ["0", "-"], tmp_path / "quick.log")
            assert quick is not None and quick.wait(30) == 0
        os.kill(fresh.proc.pid, signal.SIGSTOP)  # stopped while idle in the pool: replaced at the next lease
        deadline = time.monotonic() + 5
        while process_state(fresh.proc.pid) != "T" and time.monotonic() < deadline:  # the stop takes a moment
            time.sleep(0.01)
        with servers.lease() as third:
            assert third is not None and third is not fresh and not fresh.alive
    finally:
        servers.close()


PARENT = """\
import subprocess, sys, time
from petlbench.executors.process import start
child = start([sys.executable, "-m", "petlbench.estimate.engine"], {}, stdin=subprocess.PIPE)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_child_killed_parent_takes_it_along_even_during_its_imports(tmp_path: Path) -> None:
    """An estimator process imports torch for seconds before its own code runs: the parent-death signal is set by
    petlbench.system.launch before that, so kill -9 of the parent ends it at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the child is importing petlbench and torch now
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert exits_within(child, 1.5), "the estimator process outlived its parent killed with -9"


def exits_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


RAY_LIKE = """\
import subprocess, sys, time
from petlbench.executors.watchdog import start_watchdog
start_watchdog()
# a daemon in a session of its own that starts a helper, neither tied to this process (Ray's raylet and agents)
daemon = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; h = subprocess.Popen(['sleep', '120']); print(h.pid, flush=True); time.sleep(120)"],
    start_new_session=True, stdout=subprocess.PIPE, text=True)
helper = daemon.stdout.readline().strip()
print(daemon.pid, helper, flush=True)
time.sleep(120)
"""


def test_the_watchdog_kills_what_a_killed_parent_started() -> None:
    """What `--executor ray` relies on for a local Ray instance: kill -9 of the driver, and the daemons it started
    (and theirs) go too."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", RAY_LIKE], stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    daemon, helper = (int(pid) for pid in parent.stdout.readline().split())
    time.sleep(1.2)  # the watchdog looks every 0.5 s
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert exits_within(daemon, 3) and exits_within(helper, 3), "a daemon outlived the driver killed with -9"


RAY_DRIVER = """\
import os, sys, time
from pathlib import Path
from petlbench.executors.ray import RayExecutor
from petlbench.executors.watchdog import descendants
RayExecutor(Path(sys.argv[1]))._connect()  # a local instance, as `run --executor ray` starts one
time.sleep(2)  # the watchdog has looked at least once since ray.init returned
print(" ".join(str(pid) for pid in descendants(os.getpid())), flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_kill_9_of_a_ray_driver_takes_the_local_ray_instance_along(tmp_path: Path) -> None:
    """Ray's gcs_server, raylet, dashboard and runtime-env agents do not die with the driver; the watchdog kills
    them."""
    import ray  # noqa: F401  (a dev dependency: its absence fails here rather than skipping)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    driver = subprocess.Popen(
        [sys.executable, "-c", RAY_DRIVER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert driver.stdout is not None
    started = [int(pid) for pid in driver.stdout.readline().split()]
    try:
        assert len(started) >= 3, started  # the watchdog, gcs_server, raylet, agents, idle workers
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        left = [pid for pid in started if not exits_within(pid, 5)]
        assert not left, f"Ray processes outlived the driver killed with -9: {left}"
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
