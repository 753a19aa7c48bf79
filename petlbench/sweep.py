"""A sweep, the core of `petlbench run`: load and check a suite, plan what still needs running, run it while
every finished result is stored at once, and judge the outcome. Nothing here prints; the CLI renders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from petlbench.data.preflight import DataCheck, check_data_root, preflight
from petlbench.data.specs import resolve_data_root
from petlbench.errors import is_config_error
from petlbench.executors.base import Executor, RunEvent, RunFinished
from petlbench.executors.devices import resolve_device
from petlbench.fmt import first_line
from petlbench.measure.nvml import visible_gpus
from petlbench.results import DONE_STATUSES, RunResult, results_lock, stored_statuses, suite_dir, write_result
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import Device, RunSpec, Suite


@dataclass(frozen=True)
class Prepared:
    """A suite loaded and expanded for one device, with its data checked (when asked)."""

    suite: Suite
    runs: list[RunSpec]
    checks: list[DataCheck]
    auto_cpu: bool = False  # `device: auto` resolved to the CPU because no GPU is visible (the guard applies)


def prepare(
    suite_path: Path,
    device: str | None,
    data_root: Path | None = None,
    checks: bool = True,
    local_gpus: bool = True,
) -> Prepared:
    """Load, validate and expand a suite; resolve its device; run the pre-flight (data files, checkpoints, hub).

    `local_gpus=False` (`validate`, or a cluster executor): `cuda` needs no GPU on this machine, and the runs get
    the same run_ids as on a GPU machine.
    """
    suite = load_suite(suite_path, expand_check=False)  # expanded below, once
    root = resolve_data_root(data_root)
    requested = device or suite.device
    if requested == "cuda" and not local_gpus:  # the GPUs are on the cluster, not necessarily on this machine
        resolved: Device = "cuda"
    else:
        resolved = resolve_device(requested, visible_gpus())
    runs = expand(suite, resolved, str(root) if root else None)
    auto_cpu = requested == "auto" and resolved == "cpu"
    if not checks:
        return Prepared(suite, runs, [], auto_cpu)
    check_data_root(root, from_option=data_root is not None)
    return Prepared(suite, runs, preflight(suite, runs, root), auto_cpu)


@dataclass(frozen=True)
class Plan:
    """The runs of a suite split into those to execute and those already done (status ok or oom)."""

    todo: list[RunSpec]
    done: list[RunSpec]
    retry: list[RunSpec]  # in todo because their stored result is error/timeout/skipped


def plan(runs: Sequence[RunSpec], results_dir: Path, force: bool = False) -> Plan:
    statuses: dict[str, str] = {}
    for suite in sorted({r.suite for r in runs}):
        statuses.update(stored_statuses(suite_dir(results_dir, suite)))
    if force:
        return Plan(todo=list(runs), done=[], retry=[])
    todo = [r for r in runs if statuses.get(r.run_id) not in DONE_STATUSES]
    done = [r for r in runs if statuses.get(r.run_id) in DONE_STATUSES]
    retry = [r for r in todo if r.run_id in statuses]
    return Plan(todo=todo, done=done, retry=retry)


def execute(
    specs: Sequence[RunSpec], executor: Executor, results_dir: Path, memory_limit: int | None = None
) -> Iterator[RunEvent]:
    """Run `specs`; each result is stored before its event is yielded, so an interruption loses nothing finished.

    `memory_limit` (auto-batch probes) is recorded on every row as the limit it was judged against. A result that
    cannot be stored (disk full, read-only) raises WriteError after the executor has stopped every running worker:
    the rows stored before stay, nothing more runs.
    """
    events = executor.execute(specs)
    try:
        for event in events:
            if isinstance(event, RunFinished):
                if memory_limit is not None:
                    event.result.metrics.memory_limit_bytes = memory_limit
                write_result(results_dir, event.result)
            yield event
    finally:  # a write error, an interrupt, or the caller stopped: the executor kills what still runs
        close = getattr(events, "close", None)
        if callable(close):
            close()


def hold(results_dir: Path, suite: str) -> AbstractContextManager[None]:
    """For the whole sweep: the suite's results folder is writable (checked now) and locked against a second run."""
    return results_lock(suite_dir(results_dir, suite))


def record(results_dir: Path, results: Iterable[RunResult]) -> None:
    """Store rows no executor produced (runs `--skip-predicted-oom` did not start)."""
    for result in results:
        write_result(results_dir, result)


def config_errors(results: Iterable[RunResult]) -> dict[str, int]:
    """Distinct first lines of the runs that failed on a configuration or data error, with how many runs each."""
    failed: dict[str, int] = {}
    for result in results:
        if result.status == "error" and is_config_error(result.error_type):
            line = first_line(result.error, 300) or str(result.error_type)
            failed[line] = failed.get(line, 0) + 1
    return failed


def exit_code(results: Iterable[RunResult], strict: bool) -> int:
    """2 when a run failed on its configuration or data, 1 with --strict when any run did not end ok, else 0."""
    results = list(results)
    if config_errors(results):
        return 2
    return 1 if strict and any(r.status != "ok" for r in results) else 0
