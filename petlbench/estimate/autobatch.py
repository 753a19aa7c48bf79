"""`batch_size: auto`: the largest batch that fits a memory limit, per configuration.

The search is a small pure function over a "does batch b fit?" callable (`search_max_batch`), so it is tested
with a stub. `petlbench run` drives it twice per configuration (tuner + knob + precision + ...):

1. over the estimator (`python -m petlbench.estimate.engine` in search mode, fake tensors, seconds): the predicted
   largest batch, which seeds
2. the real search: every probe is an ordinary RunSpec with a concrete batch size, run in its own worker and
   stored as a row under `results/<suite>/`, so a rerun resumes from the stored rows and reruns nothing. A
   probe fits when it ends `ok` with `peak_allocated_bytes` ≤ the limit (on CPU: the tracked peak); an `oom`, or
   a peak over the limit, does not fit; an `error`/`timeout` ends that configuration's search.

Search: from the seed, gallop (offsets 1, 2, 4, ... steps of `multiple_of`) up while probes fit, or down while
they do not, then bisect between the largest batch that fit and the smallest that did not. With an exact seed
that is two probes: the seed (fits) and the next size (does not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from petlbench.errors import PetlbenchError
from petlbench.estimate.client import Estimate
from petlbench.executors import Executor, RunFinished
from petlbench.fmt import first_line
from petlbench.results import RunResult
from petlbench.spec.models import RunSpec
from petlbench.sweep import execute


@dataclass(frozen=True)
class Probe:
    batch: int
    fits: bool


@dataclass(frozen=True)
class SearchResult:
    """The outcome of one search: `best` fits and `best + multiple_of` (= `first_over`) does not.

    `best` is None when even the smallest batch does not fit; `first_over` is None when the largest allowed batch
    fits (the search hit `max`).
    """

    best: int | None
    first_over: int | None
    probes: tuple[Probe, ...]


def search_max_batch(
    fits: Callable[[int], bool],
    *,
    lo: int = 1,
    hi: int = 4096,
    multiple_of: int = 1,
    seed: int | None = None,
) -> SearchResult:
    """Largest b in [lo, hi], a multiple of `multiple_of`, with fits(b), assuming fits is monotone (True, then False).

    `seed` is where to start (the estimate's answer); without one the search starts at `lo` and gallops up. Each
    batch is probed at most once. Exceptions from `fits` propagate (the caller decides what a failed probe means).
    """
    if multiple_of <= 0 or lo <= 0 or hi < lo:
        raise ValueError(f"bad search range: lo={lo}, hi={hi}, multiple_of={multiple_of}")
    g = multiple_of
    k_lo, k_hi = -(-lo // g), hi // g  # search over k, batch = k * g
    if k_hi < k_lo:
        raise ValueError(f"no multiple of {g} in [{lo}, {hi}]")
    probes: list[Probe] = []
    seen: dict[int, bool] = {}

    def test(k: int) -> bool:
        if k not in seen:
            seen[k] = fits(k * g)
            probes.append(Probe(k * g, seen[k]))
        return seen[k]

    k0 = min(max((seed if seed is not None else lo) // g, k_lo), k_hi)
    good: int | None = None
    bad: int | None = None
    if test(k0):
        good, step = k0, 1
        while good < k_hi:
            k = min(good + step, k_hi)
            if test(k):
                good, step = k, step * 2
            else:
                bad = k
                break
    else:
        bad, step = k0, 1
        while bad > k_lo:
            k = max(bad - step, k_lo)
            if test(k):
                good = k
                break
            bad, step = k, step * 2
    while good is not None and bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if test(mid):
            good = mid
        else:
            bad = mid
    return SearchResult(
        best=None if good is None else good * g,
        first_over=None if bad is None else bad * g,
        probes=tuple(probes),
    )


def linear_seed(b1: int, peak1: int, b2: int, peak2: int, limit: int) -> int:
    """Where peak(b) = peak1 + slope·(b − b1) reaches `limit` (activations grow linearly with the batch)."""
    if b2 == b1 or peak2 <= peak1:
        return b2 if peak2 <= limit else b1
    slope = (peak2 - peak1) / (b2 - b1)
    return max(1, int(b1 + (limit - peak1) / slope))


# ---------------------------------------------------------------------------------------------------------------
# The real search (parent side, torch-free)


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
    on_result: Callable[[RunResult, bool | None, bool], None] | None = None,
) -> Iterator[AutoBatchOutcome]:
    """Search every template's largest fitting batch with real runs; yields each outcome when its search ends.

    `estimates` maps template run_id → its estimate in search mode (the seed). `stored` maps run_id → a stored
    result (ok/oom rows of earlier invocations): those probes are not re-run. Every new probe's result is written
    (with `memory_limit_bytes`) before `on_result(result, fits, reused)` is called.
    """
    for template in templates:
        estimate = estimates.get(template.run_id)
        outcome = AutoBatchOutcome(
            template=template,
            predicted=estimate.max_batch if estimate else None,
            predicted_error=estimate.error if estimate else "not estimated",
        )

        def fits(batch: int, template: RunSpec = template, outcome: AutoBatchOutcome = outcome) -> bool:
            spec = template.model_copy(update={"batch_size": batch})
            reused = spec.run_id in stored
            if reused:
                result = stored[spec.run_id]
            else:
                events = execute([spec], executor, results_dir, memory_limit=limit)
                result = next(e.result for e in events if isinstance(e, RunFinished))
            outcome.results.append(result)
            try:
                ok = probe_fits(result, limit)
            except ProbeFailed:
                if on_result:
                    on_result(result, None, reused)
                raise
            if on_result:
                on_result(result, ok, reused)
            return ok

        try:
            outcome.search = search_max_batch(fits, lo=lo, hi=hi, multiple_of=multiple_of, seed=outcome.predicted)
        except ProbeFailed as exc:
            outcome.failure = str(exc)
        yield outcome


def stored_probes(folder: Path) -> dict[str, RunResult]:
    """run_id → result of every ok/oom row in a suite folder (what a rerun of an auto-batch search reuses)."""
    import math

    from petlbench.columns import Metrics
    from petlbench.results import DONE_STATUSES, load_results

    if not folder.exists():
        return {}
    frame = load_results([folder])
    if frame.empty or "spec_json" not in frame.columns:
        return {}
    stored: dict[str, RunResult] = {}
    for row in frame.to_dict("records"):
        if row.get("status") not in DONE_STATUSES or not isinstance(row.get("spec_json"), str):
            continue
        values = {
            name: row[name]
            for name in Metrics.model_fields
            if name in row and row[name] is not None and not (isinstance(row[name], float) and math.isnan(row[name]))
        }
        stored[str(row["run_id"])] = RunResult(
            spec=RunSpec.model_validate_json(row["spec_json"]),
            status=row["status"],
            error=row.get("error") if isinstance(row.get("error"), str) else None,
            metrics=Metrics.model_validate(values),
            created_at=str(row.get("created_at")),
            duration_s=row["duration_s"] if isinstance(row.get("duration_s"), float) else None,
        )
    return stored
