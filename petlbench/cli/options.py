"""Numeric command-line options, checked like suite fields: finite and in range, or one ConfigError line naming the
option and what to give instead (exit 2). Click parses `nan`, `inf` and `1e400` as floats and accepts any integer;
nothing downstream should have to guess what a NaN threshold means (`compare --max-increase nan` would pass every
run)."""

from __future__ import annotations

import math

from petlbench.cli.console import err
from petlbench.errors import ConfigError
from petlbench.executors.devices import cap_jobs


def finite(option: str, value: float, minimum: float | None = None, above: float | None = None) -> float:
    """`value` when finite and ≥ `minimum` (> `above`); else a ConfigError naming `option`."""
    if not math.isfinite(value):
        raise ConfigError(f"{option}: must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{option}: must be ≥ {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise ConfigError(f"{option}: must be > {above:g}, got {value:g}")
    return value


def at_least(option: str, value: int | None, minimum: int = 1) -> int | None:
    """An integer option (None: not given) of at least `minimum`."""
    if value is not None and value < minimum:
        raise ConfigError(f"{option}: must be ≥ {minimum}, got {value}")
    return value


def checked_jobs(jobs: int, what: str) -> int:
    """`--jobs` for processes on this machine: at least 1, at most one per core (a `note:` line says when it was
    lowered)."""
    at_least("--jobs", jobs)
    capped, note = cap_jobs("--jobs", jobs, what)
    if note:
        err.print(f"note: {note}")
    return capped or jobs
