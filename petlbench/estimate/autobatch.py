"""`batch_size: auto`: the search for the largest batch that fits a memory limit, per configuration.

The search is a small pure function over a "does batch b fit?" callable (`search_max_batch`), so it is tested
with a stub. `petlbench run` drives it twice per configuration (tuner + knob + precision + ...; the real search
lives in petlbench/run/batch_search.py):

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

from collections.abc import Callable, Generator
from dataclasses import dataclass


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
    search = max_batch_search(lo=lo, hi=hi, multiple_of=multiple_of, seed=seed)
    batch = next(search)
    while True:
        try:
            batch = search.send(fits(batch))
        except StopIteration as stop:
            result: SearchResult = stop.value
            return result


def max_batch_search(
    *, lo: int = 1, hi: int = 4096, multiple_of: int = 1, seed: int | None = None
) -> Generator[int, bool, SearchResult]:
    """`search_max_batch` as a coroutine: yields each batch to probe, is sent whether it fits, returns the result.
    (A caller that runs probes and reports them as they end drives it step by step.)"""
    if multiple_of <= 0 or lo <= 0 or hi < lo:
        raise ValueError(f"bad search range: lo={lo}, hi={hi}, multiple_of={multiple_of}")
    g = multiple_of
    k_lo, k_hi = -(-lo // g), hi // g  # search over k, batch = k * g
    if k_hi < k_lo:
        raise ValueError(f"no multiple of {g} in [{lo}, {hi}]")
    probes: list[Probe] = []
    seen: dict[int, bool] = {}

    def test(k: int) -> Generator[int, bool, bool]:
        if k not in seen:
            seen[k] = yield k * g
            probes.append(Probe(k * g, seen[k]))
        return seen[k]

    k0 = min(max((seed if seed is not None else lo) // g, k_lo), k_hi)
    good: int | None = None
    bad: int | None = None
    if (yield from test(k0)):
        good, step = k0, 1
        while good < k_hi:
            k = min(good + step, k_hi)
            if (yield from test(k)):
                good, step = k, step * 2
            else:
                bad = k
                break
    else:
        bad, step = k0, 1
        while bad > k_lo:
            k = max(bad - step, k_lo)
            if (yield from test(k)):
                good = k
                break
            bad, step = k, step * 2
    while good is not None and bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if (yield from test(mid)):
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
