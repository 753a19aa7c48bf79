"""`petlbench estimate` as a core function: expand a suite, check its models, estimate every run, store the rows.

`predict(request)` yields `Estimating` progress and returns a `Prediction` (the CLI renders it). Estimate rows go to
`results/<suite>.estimate/`, apart from measurements; a row is a prediction of the run's memory and does not depend
on the memory it is judged against: FITS/OOM is computed from it when reading (docs/estimation.md), so estimates
against 24GiB and then 80GiB keep both answers.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from petlbench.estimate.client import (
    Estimate,
    Estimating,
    SearchRequest,
    estimate_device,
    estimate_result,
    estimating,
    fits,
    judged_bytes,
    model_key,
    targets_for,
)
from petlbench.estimate.gpus import DEFAULT_HEADROOM, Target
from petlbench.estimate.guard import Machine, PlanCost, StepCost, plan_seconds
from petlbench.measure.nvml import visible_gpus
from petlbench.results import RunResult, check_writable, estimate_dir, suite_dir, write_result
from petlbench.run.probe import probe_suite
from petlbench.run.sweep import quickstart_jobs
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import Device, RunSpec, Suite


@dataclass(frozen=True)
class PredictRequest:
    suite: Path
    device: str | None = None
    device_memory: str | None = None  # '80GiB' or '24GiB,48GiB,80GiB'
    results_dir: Path = Path("results")
    jobs: int = 1
    quickstart: bool = False  # the built-in quickstart: its plan runs one run per core
    gpu: str | None = None  # GPU presets, 'h100-80gb,a100-40gb'
    headroom: str = DEFAULT_HEADROOM


@dataclass
class Prediction:
    """What an estimate of a suite found."""

    suite: Suite
    device: Device
    runs: list[RunSpec]
    targets: list[Target]  # the cards (or memory sizes) judged on; FITS/OOM against the first
    folder: Path  # where the estimate rows went
    measured: Path  # where the suite's measured rows go (never mixed with these)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    search: SearchRequest | None = None
    seconds: float = 0.0
    plan: PlanCost | None = None  # CPU plans: how long running them would take here (the guard's model)

    @property
    def limit(self) -> int | None:
        return self.targets[0].memory_bytes if self.targets else None

    @property
    def failed(self) -> list[Estimate]:
        return [e for e in self.estimates.values() if e.metrics is None]

    @property
    def over(self) -> list[Estimate]:
        """Estimates predicted over the first limit."""
        return [
            e
            for e in self.estimates.values()
            if e.metrics is not None and fits(judged_bytes(e.metrics), self.limit) is False
        ]


def predict(request: PredictRequest) -> Generator[Estimating, None, Prediction]:
    """Estimate every run of a suite (or, for `batch_size: auto`, the largest batch predicted to fit) and store one
    row per run; raises ConfigError before estimating anything when the suite, a model or an option is invalid."""
    suite = load_suite(request.suite)
    device = estimate_device(request.device or suite.device)
    runs = expand(suite, device)
    targets = targets_for(
        device, request.gpu, request.device_memory, visible_gpus(), request.headroom, required=suite.auto_batch_size
    )
    folders = estimate_dir(request.results_dir, suite.name), suite_dir(request.results_dir, suite.name)
    check_writable(folders[0])  # a read-only or full folder fails now, not after every estimate
    probe_suite(suite, runs)  # every model built on meta first: a bad knob is one line, not N failed estimates
    prediction = Prediction(suite, device, runs, targets, *folders)
    if suite.auto_batch_size:
        r = suite.batch_range
        assert prediction.limit is not None
        prediction.search = SearchRequest(limit_bytes=prediction.limit, min=r.min, max=r.max, multiple_of=r.multiple_of)
    start = time.monotonic()
    prediction.estimates = yield from _estimates(runs, prediction.search, request.jobs, targets)
    prediction.seconds = time.monotonic() - start
    if device == "cpu" and prediction.search is None:
        parallel = quickstart_jobs(runs) if request.quickstart else 1
        prediction.plan = cpu_plan(runs, prediction.estimates, parallel, report=request.quickstart)
    for result in rows(runs, prediction.estimates):
        write_result(request.results_dir, result)
    return prediction


def _estimates(
    runs: Sequence[RunSpec], search: SearchRequest | None, jobs: int, targets: Sequence[Target]
) -> Generator[Estimating, None, dict[str, Estimate]]:
    events = estimating(runs, search, jobs, targets=targets, fit_search=bool(targets))
    while True:
        try:
            done, total, label = next(events)
        except StopIteration as stop:
            answer: dict[str, Estimate] = stop.value
            return answer
        yield Estimating(done, total, label)


def cpu_plan(
    runs: Sequence[RunSpec], estimates: dict[str, Estimate], parallel: int, report: bool = False
) -> PlanCost | None:
    """The plan's wall time on this CPU from every run's own estimate (petlbench/estimate/guard.py's model)."""
    machine = next((m for e in estimates.values() if (m := Machine.measured(e.env)) is not None), None)
    if machine is None:
        return None
    costs: dict[str, StepCost] = {}
    for run in runs:
        cost = StepCost.of(estimates.get(run.run_id), run.batch_size)
        if cost is not None:
            costs.setdefault(model_key(run), cost)
    seconds = plan_seconds(runs, costs, machine, parallel, report)
    return PlanCost(seconds, None, None, [], parallel, machine.load)


def rows(runs: Sequence[RunSpec], estimates: dict[str, Estimate]) -> list[RunResult]:
    """The estimate rows to store: one per estimated run (at the searched batch for `batch_size: auto`)."""
    stored = []
    for run in runs:
        found = estimates.get(run.run_id)
        if found is None:
            continue
        spec = run if found.max_batch is None else run.model_copy(update={"batch_size": found.max_batch})
        stored.append(estimate_result(spec, found))
    return stored
