"""Step timing: CUDA events on GPU (no host-clock skew from async launches), perf_counter on CPU.

The protocol (`MeasureSpec.timing`): the steps of the memory window are timed, then more steps until at least
`min_steps` steps and `min_time_s` of step time are measured (at most `max_steps`). A row reports the median, p90
and the interquartile range of its step times; when IQR / median exceeds `max_dispersion` the timing is flagged
unstable (other work on the machine, thermal throttling), and reports never build a throughput front from it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from petlbench.spec.models import TimingProtocol


@dataclass(frozen=True)
class Timing:
    times_s: list[float]

    @property
    def iqr_s(self) -> float:
        """Interquartile range of the step times (0 with fewer than two steps)."""
        if len(self.times_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q3 - q1

    @property
    def dispersion(self) -> float:
        """IQR / median: robust to the odd slow step, large when the machine is busy."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def p90_s(self) -> float:
        ordered = sorted(self.times_s)
        # nearest-rank p90: with few steps this is the slowest or second slowest, never an interpolation
        rank = max(1, -(-9 * len(ordered) // 10))
        return ordered[rank - 1]


def time_steps(fn: Callable[[], object], steps: int, device: torch.device) -> Timing:
    """Time `steps` calls of `fn`. Callers warm up first; on CUDA the device is synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Timing([s.elapsed_time(e) / 1000.0 for s, e in zip(starts, ends, strict=True)])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(times)


def time_more(fn: Callable[[], object], timing: Timing, protocol: TimingProtocol, device: torch.device) -> Timing:
    """`timing` extended with more timed calls of `fn` until the protocol is satisfied (or its cap is reached)."""
    times = list(timing.times_s)
    while len(times) < protocol.max_steps and (len(times) < protocol.min_steps or sum(times) < protocol.min_time_s):
        times += time_steps(fn, 1, device).times_s
    return Timing(times)
