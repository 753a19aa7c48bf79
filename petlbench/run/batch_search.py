"""`batch_size: auto` with real runs: per configuration, the largest batch that fits, probed by runs that are stored
like any other (petlbench/estimate/autobatch.py has the search itself and how the estimate seeds it)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from petlbench.errors import PetlbenchError
from petlbench.estimate.autobatch import SearchResult, max_batch_search
from petlbench.estimate.client import Estimate
from petlbench.executors import Executor, RunFinished
from petlbench.fmt import first_line
from petlbench.results import DONE_STATUSES, RunResult, stored_results
from petlbench.run.execute import execute
from petlbench.spec.models import RunSpec


class ProbeFailed(PetlbenchError):
    """A probe ended error/timeout: whether that batch fits is unknown, so the configuration's search stops."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(f"probe at batch {result.spec.batch_size} ended {result.status}: {first_line(result.error)}")
        self.result = result


@dataclass
class AutoBatchOutcome:
    """One configuration's search: the predicted and the confirmed largest batch, and every probe's row."""

    template: RunSpec
    predicted: int | None  # from the estimate (None if it failed)
    predicted_error: str | None
    search: SearchResult | None = None
    failure: str | None = None  # why the real search stopped early
    results: list[RunResult] = field(default_factory=list)  # every probe, in probe order

    @property
    def best_result(self) -> RunResult | None:
        if self.search is None or self.search.best is None:
            return None
        return next((r for r in self.results if r.spec.batch_size == self.search.best), None)


def probe_fits(result: RunResult, limit: int) -> bool:
    """ok and within the limit → fits; oom, or a peak over the limit → does not; error/timeout → ProbeFailed."""
    if result.status == "oom":
        return False
    if result.status != "ok":
        raise ProbeFailed(result)
    peak = result.metrics.peak_allocated_bytes
    return peak is not None and peak <= limit


@dataclass(frozen=True)
class Probed:
    """A probe ended (or was reused from an earlier invocation): whether its batch fits (None: it failed)."""

    result: RunResult
    fits: bool | None
    reused: bool


def run_auto_batch(
    templates: Sequence[RunSpec],
    estimates: Mapping[str, Estimate],
    limit: int,
    executor: Executor,
    results_dir: Path,
    stored: Mapping[str, RunResult],
    lo: int,
    hi: int,
    multiple_of: int,
) -> Iterator[Probed | AutoBatchOutcome]:
    """Search every template's largest fitting batch with real runs, yielding each probe as it ends and each
    configuration's outcome when its search ends.

    `estimates` maps template run_id → its estimate in search mode (the seed). `stored` maps run_id → a stored
    result (ok/oom rows of earlier invocations): those probes are not re-run. Every new probe's result is written
    (with `memory_limit_bytes`) before it is yielded.
    """
    for template in templates:
        estimate = estimates.get(template.run_id)
        outcome = AutoBatchOutcome(
            template=template,
            predicted=estimate.max_batch if estimate else None,
            predicted_error=estimate.error if estimate else "not estimated",
        )
        search = max_batch_search(lo=lo, hi=hi, multiple_of=multiple_of, seed=outcome.predicted)
        batch = next(search)
        while True:
            spec = template.model_copy(update={"batch_size": batch})
            reused = spec.run_id in stored
            result = stored[spec.run_id] if reused else _run_one(spec, executor, results_dir, limit)
            outcome.results.append(result)
            try:
                fit = probe_fits(result, limit)
            except ProbeFailed as exc:
                yield Probed(result, None, reused)
                outcome.failure = str(exc)
                break
            yield Probed(result, fit, reused)
            try:
                batch = search.send(fit)
            except StopIteration as stop:
                outcome.search = stop.value
                break
        yield outcome


def _run_one(spec: RunSpec, executor: Executor, results_dir: Path, limit: int) -> RunResult:
    finished = [
        e.result for e in execute([spec], executor, results_dir, memory_limit=limit) if isinstance(e, RunFinished)
    ]
    return finished[0]


def stored_probes(folder: Path) -> dict[str, RunResult]:
    """run_id → result of every ok/oom row in a suite folder (what a rerun of an auto-batch search reuses)."""
    return {r.run_id: r for r in stored_results(folder) if r.status in DONE_STATUSES}
