"""Step timing: CUDA events on GPU (no host-clock skew from async launches), perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    times_s: list[float]

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
