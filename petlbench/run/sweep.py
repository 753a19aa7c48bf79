"""The sweep, the core of `petlbench run`: load and check a suite, plan what still needs running, run it while every
finished result is stored at once, and judge the outcome.

`sweep(request)` is a generator of events (`Planned`, `RunStarted`, `RunFinished`, ..., `Finished`); the CLI
renders them and decides nothing. Nothing here prints. An interrupt (Ctrl-C, SIGTERM) propagates out of the
generator after the executor has stopped every worker; the rows stored before it stay.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

from petlbench.data.specs import resolve_data_root
from petlbench.errors import ConfigError, is_config_error
from petlbench.estimate.client import (
    Estimate,
    Estimating,
    SearchRequest,
    estimating,
    memory_limit,
    split_predicted_oom,
)
from petlbench.estimate.guard import PlanCost, check_cpu_plan
from petlbench.executors import Executor, ExecutorKind, RunFinished, RunStarted, make_executor
from petlbench.executors.devices import available_cores, cap_jobs, resolve_device
from petlbench.executors.forkclient import ForkServers, fork_server_enabled
from petlbench.fmt import first_line
from petlbench.measure.nvml import visible_gpus
from petlbench.results import (
    DONE_STATUSES,
    RunResult,
    stored_durations,
    stored_results,
    stored_statuses,
    suite_dir,
    summarize,
)
from petlbench.run.execute import execute, hold, record
from petlbench.run.preflight import DataCheck, check_data_root, preflight
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import Device, RunSpec, Suite

if TYPE_CHECKING:
    from petlbench.report import ReportSummary
    from petlbench.run.batch_search import AutoBatchOutcome

ROUGH_SECONDS_PER_RUN: Final = {"cpu": 20.0, "cuda": 60.0}  # the ETA before any run of this suite finished


# ---------------------------------------------------------------------------------------------------------------
# Steps


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
    servers: ForkServers | None = None,
) -> Prepared:
    """Load, validate and expand a suite; resolve its device; run the pre-flight (data files, checkpoints, hub,
    and the configuration probe, forked from `servers` when given).

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
    return Prepared(suite, runs, preflight(suite, runs, root, servers), auto_cpu)


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


def builtin_quickstart() -> Path:
    """The quickstart suite shipped inside the package (so `petlbench run` works from any folder)."""
    return Path(str(importlib.resources.files("petlbench").joinpath("suites/quickstart.yaml")))


def quickstart_jobs(runs: Sequence[RunSpec]) -> int:
    """The quickstart pins one torch thread per run, so on a CPU it runs one run per core (up to 2): each run
    still has a core of its own, and a new user waits half as long."""
    threads = max((r.measure.cpu_threads or available_cores() for r in runs), default=1)
    return max(1, min(2, available_cores() // threads))


def in_order(rows: Sequence[RunResult], runs: Sequence[RunSpec]) -> list[RunResult]:
    """Stored rows in the suite's order (rows of runs the suite no longer has, last)."""
    position = {run.run_id: i for i, run in enumerate(runs)}
    return sorted(rows, key=lambda r: position.get(r.run_id, len(position)))


def seconds_per_run(folder: Path, device: str) -> float:
    """The mean duration of the runs already stored in `folder`, else a rough constant for the device (the ETA's
    seed before a run of this invocation finished)."""
    durations = stored_durations(folder)  # one column of each file: planning stays fast with thousands of rows
    return sum(durations) / len(durations) if durations else ROUGH_SECONDS_PER_RUN.get(device, 30.0)


# ---------------------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class SweepRequest:
    """What `petlbench run` was asked to do, parsed once at the command line."""

    suite: Path
    quickstart: bool = False  # the built-in quickstart: one run per core, and a report at the end
    device: str | None = None
    results_dir: Path = Path("results")
    reports_dir: Path | None = None  # where the quickstart's report goes
    force: bool = False
    dry_run: bool = False
    strict: bool = False
    jobs: int | None = None
    executor: ExecutorKind = "local"
    address: str | None = None
    data_root: Path | None = None
    preflight: bool = True
    skip_predicted_oom: bool = False
    memory_limit: str | None = None


@dataclass(frozen=True)
class Planned:
    """The suite is valid and planned: what will run, where its rows go, how many at once."""

    suite: Suite
    runs: list[RunSpec]
    plan: Plan
    where: Path
    device: str
    executor: str
    parallel: int
    seed_s: float  # the ETA's guess of a run's duration before one finished
    notes: list[str] = field(default_factory=list)  # options adjusted to this machine (--jobs above the cores)


@dataclass(frozen=True)
class Guarded:
    """A `device: auto` plan on a CPU passed the guard: what it predicted."""

    cost: PlanCost


@dataclass(frozen=True)
class Skipped:
    """--skip-predicted-oom: the runs predicted not to fit, stored as `skipped` rows."""

    results: list[RunResult]
    limit: int
    considered: int
    unestimated: int  # runs that could not be estimated (they run)


@dataclass(frozen=True)
class AutoBatchPlanned:
    suite: Suite
    templates: list[RunSpec]
    limit: int
    where: Path


@dataclass(frozen=True)
class ProbeFinished:
    """An auto-batch probe ended (or was reused from an earlier invocation): whether its batch fits."""

    result: RunResult
    fits: bool | None
    reused: bool
    limit: int


@dataclass(frozen=True)
class SearchFinished:
    outcome: AutoBatchOutcome


@dataclass(frozen=True)
class Reporting:
    """The quickstart is writing its report (figures take a while)."""

    out: Path


@dataclass
class Finished:
    """The end of a sweep: this invocation's results, every stored row of the suite, and the verdict."""

    suite: Suite
    where: Path
    results: list[RunResult] = field(default_factory=list)  # what ran (or was skipped) in this invocation
    rows: list[RunResult] = field(default_factory=list)  # every row the suite's folder holds now
    config_errors: dict[str, int] = field(default_factory=dict)
    exit_code: int = 0
    dry_run: bool = False
    report: ReportSummary | None = None
    report_error: str | None = None
    outcomes: list[AutoBatchOutcome] = field(default_factory=list)  # batch_size: auto
    limit: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(summarize(self.results).items()))


SweepEvent: TypeAlias = (
    Planned
    | Guarded
    | Estimating
    | Skipped
    | RunStarted
    | RunFinished
    | AutoBatchPlanned
    | ProbeFinished
    | SearchFinished
    | Reporting
    | Finished
)


def sweep(request: SweepRequest) -> Iterator[SweepEvent]:
    """Run a suite as asked, yielding what happens; the last event is `Finished` (unless an error or an interrupt
    ends it: PetlbenchError for bad input, KeyboardInterrupt for Ctrl-C/SIGTERM, after every worker stopped)."""
    local = request.executor == "local"
    with ExitStack() as stack:
        servers = stack.enter_context(ForkServers(dict(os.environ))) if local and fork_server_enabled() else None
        prepared = prepare(request.suite, request.device, request.data_root, request.preflight, local, servers)
        suite, runs = prepared.suite, prepared.runs
        device = runs[0].device if runs else "cpu"
        jobs, jobs_note = request.jobs, ""
        if local and device == "cpu":  # CPU runs share this machine's cores: never more runs than cores
            jobs, jobs_note = cap_jobs("--jobs", jobs)
        if request.quickstart and jobs is None and local and device == "cpu":
            jobs = quickstart_jobs(runs)
        runner = make_executor(request.executor, request.results_dir, device, jobs, request.address, servers=servers)
        if not request.dry_run:  # writable, and no other run of this suite writes it while this one does
            stack.enter_context(hold(request.results_dir, suite.name))
        if suite.auto_batch_size:
            yield from _auto_batch(request, suite, runs, runner)
            return
        limit = _limit(request, runs)
        todo = plan(runs, request.results_dir, request.force)
        where = suite_dir(request.results_dir, suite.name)
        parallel = jobs or (len(visible_gpus()) if device == "cuda" else 1) or 1
        seed = seconds_per_run(where, device)
        yield Planned(suite, runs, todo, where, device, str(runner), parallel, seed, [jobs_note] if jobs_note else [])
        if request.dry_run:  # the dry run shows the plan only: no stored row is read in full
            yield Finished(suite, where, dry_run=True)
            return
        if not todo.todo:
            yield Finished(suite, where, rows=in_order(stored_results(where), runs))
            return
        if prepared.auto_cpu:  # no GPU here: refuse a CPU plan that cannot fit or would take hours
            yield Guarded(check_cpu_plan(suite.source, todo.todo, parallel))
        results: list[RunResult] = []
        specs = todo.todo
        if limit is not None:
            estimates = yield from _estimates(specs)
            specs, skipped = split_predicted_oom(specs, estimates, limit)
            record(request.results_dir, skipped)
            results.extend(skipped)
            unestimated = sum(
                1 for s in specs if estimates.get(s.run_id) is None or estimates[s.run_id].metrics is None
            )
            yield Skipped(skipped, limit, len(todo.todo), unestimated)
        for event in execute(specs, runner, request.results_dir):
            if isinstance(event, RunFinished):
                results.append(event.result)
            yield event
        finished = Finished(suite, where, results, in_order(stored_results(where), runs), config_errors(results))
        finished.exit_code = exit_code(results, request.strict)
        if request.quickstart and request.reports_dir is not None:  # a new user sees the figures too
            yield Reporting(request.reports_dir)
            finished.report, finished.report_error = _report(where, request.reports_dir)
        yield finished


def _limit(request: SweepRequest, runs: Sequence[RunSpec]) -> int | None:
    if request.memory_limit is not None and not request.skip_predicted_oom:
        raise ConfigError("--memory-limit: only used with --skip-predicted-oom or a suite with batch_size: auto")
    if not request.skip_predicted_oom or not runs:
        return None
    return memory_limit(request.memory_limit, runs[0].device, visible_gpus(), "--memory-limit", required=True)


def _estimates(
    specs: Sequence[RunSpec], search: SearchRequest | None = None
) -> Generator[Estimating, None, dict[str, Estimate]]:
    """Estimate `specs` in estimator processes, yielding progress; returns run_id → Estimate."""
    events = estimating(specs, search, jobs=max(1, min(2, available_cores())))
    while True:
        try:
            done, total, label = next(events)
        except StopIteration as stop:
            answer: dict[str, Estimate] = stop.value
            return answer
        yield Estimating(done, total, label)


def _auto_batch(
    request: SweepRequest, suite: Suite, templates: list[RunSpec], runner: Executor
) -> Iterator[SweepEvent]:
    """`batch_size: auto`: per configuration, the largest batch that fits, seeded by the estimate, confirmed by
    real runs stored like any other."""
    from petlbench.run.batch_search import Probed, run_auto_batch, stored_probes

    where = suite_dir(request.results_dir, suite.name)
    if not templates:
        yield Finished(suite, where, dry_run=request.dry_run)
        return
    r = suite.batch_range
    limit = memory_limit(request.memory_limit, templates[0].device, visible_gpus(), "--memory-limit", required=True)
    assert limit is not None
    yield AutoBatchPlanned(suite, templates, limit, where)
    if request.dry_run:
        yield Finished(suite, where, dry_run=True, limit=limit)
        return
    search = SearchRequest(limit_bytes=limit, min=r.min, max=r.max, multiple_of=r.multiple_of)
    estimates = yield from _estimates(templates, search)
    stored = {} if request.force else stored_probes(where)
    finished = Finished(suite, where, limit=limit)
    searches = run_auto_batch(
        templates, estimates, limit, runner, request.results_dir, stored, r.min, r.max, r.multiple_of
    )
    for event in searches:
        if isinstance(event, Probed):
            yield ProbeFinished(event.result, event.fits, event.reused, limit)
            finished.results.append(event.result)
        else:
            finished.outcomes.append(event)
            yield SearchFinished(event)
    failed = any(o.failure or o.search is None or o.search.best is None for o in finished.outcomes)
    finished.exit_code = 1 if request.strict and failed else 0
    finished.rows = in_order(stored_results(where), templates)
    yield finished


def _report(results: Path, reports: Path) -> tuple[ReportSummary | None, str | None]:
    from petlbench.errors import PetlbenchError
    from petlbench.report import build_report

    try:
        return build_report([results], ["all"], reports, None), None
    except PetlbenchError as exc:
        return None, str(exc)
