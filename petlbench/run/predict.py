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
    memory_limit,
)
from petlbench.measure.nvml import visible_gpus
from petlbench.results import RunResult, check_writable, estimate_dir, suite_dir, write_result
from petlbench.run.probe import probe_suite
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


@dataclass
class Prediction:
    """What an estimate of a suite found."""

    suite: Suite
    device: Device
    runs: list[RunSpec]
    limits: list[int]  # the memory sizes asked for (FITS/OOM against the first)
    folder: Path  # where the estimate rows went
    measured: Path  # where the suite's measured rows go (never mixed with these)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    search: SearchRequest | None = None
    seconds: float = 0.0

    @property
    def limit(self) -> int | None:
        return self.limits[0] if self.limits else None

    @property
    def failed(self) -> list[Estimate]:
        return [e for e in self.estimates.values() if e.metrics is None]

    @property
    def over(self) -> list[Estimate]:
        """Estimates predicted over the first limit."""
        return [
            e
            for e in self.estimates.values()
            if e.metrics is not None and fits(e.metrics.peak_allocated_bytes, self.limit) is False
        ]


def limits_of(text: str | None, device: Device, required: bool) -> list[int]:
    """The memory sizes of `--device-memory` (a comma list; default: the visible GPU's for CUDA runs)."""
    texts = [t.strip() for t in text.split(",")] if text else [None]
    sizes = [memory_limit(t, device, visible_gpus(), "--device-memory", required=required) for t in texts]
    return [size for size in sizes if size is not None]


def predict(request: PredictRequest) -> Generator[Estimating, None, Prediction]:
    """Estimate every run of a suite (or, for `batch_size: auto`, the largest batch predicted to fit) and store one
    row per run; raises ConfigError before estimating anything when the suite, a model or an option is invalid."""
    suite = load_suite(request.suite)
    device = estimate_device(request.device or suite.device)
    runs = expand(suite, device)
    limits = limits_of(request.device_memory, device, required=suite.auto_batch_size)
    folders = estimate_dir(request.results_dir, suite.name), suite_dir(request.results_dir, suite.name)
    check_writable(folders[0])  # a read-only or full folder fails now, not after every estimate
    probe_suite(suite, runs)  # every model built on meta first: a bad knob is one line, not N failed estimates
    prediction = Prediction(suite, device, runs, limits, *folders)
    if suite.auto_batch_size:
        r = suite.batch_range
        assert prediction.limit is not None
        prediction.search = SearchRequest(limit_bytes=prediction.limit, min=r.min, max=r.max, multiple_of=r.multiple_of)
    start = time.monotonic()
    prediction.estimates = yield from _estimates(runs, prediction.search, request.jobs)
    prediction.seconds = time.monotonic() - start
    for result in rows(runs, prediction.estimates):
        write_result(request.results_dir, result)
    return prediction


def _estimates(
    runs: Sequence[RunSpec], search: SearchRequest | None, jobs: int
) -> Generator[Estimating, None, dict[str, Estimate]]:
    events = estimating(runs, search, jobs)
    while True:
        try:
            done, total, label = next(events)
        except StopIteration as stop:
            answer: dict[str, Estimate] = stop.value
            return answer
        yield Estimating(done, total, label)


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
