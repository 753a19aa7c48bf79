"""Published numbers beside ours: pair a suite's `published:` block with its stored rows (pure: torch- and
pandas-free, like report/fit.py).

A suite in suites/papers/ reproduces a paper's memory figure or table and carries its numbers
(`petlbench.spec.models.Published`). `compare` pairs every published value with the suite's rows of the same
method (and knob, batch size, precision where the value names them): the estimate row (`memory_source =
estimate`, from `petlbench estimate`) and the measured row (`petlbench run`), each giving published / ours.
Rows are plain mappings (parquet rows, `DataFrame.to_dict("records")`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from petlbench.fmt import missing
from petlbench.spec.models import Published, PublishedValue

ESTIMATE: Final = "estimate"
UNIT_BYTES: Final = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@dataclass(frozen=True)
class Comparison:
    """One published value and our predicted and measured counterparts, in bytes (None: no such row)."""

    method: str
    label: str
    published_bytes: float
    predicted_bytes: float | None
    measured_bytes: float | None
    note: str = ""

    @property
    def predicted_ratio(self) -> float | None:
        """published / predicted."""
        return _ratio(self.published_bytes, self.predicted_bytes)

    @property
    def measured_ratio(self) -> float | None:
        """published / measured."""
        return _ratio(self.published_bytes, self.measured_bytes)


def _ratio(published: float, ours: float | None) -> float | None:
    return published / ours if ours else None


def _matches(value: PublishedValue, row: Mapping[str, Any]) -> bool:
    if row.get("method") != value.method or row.get("status", "ok") != "ok":
        return False
    for field in ("knob", "batch_size", "precision"):
        wanted = getattr(value, field)
        if wanted is None:
            continue
        have = row.get(field)
        if have is None or missing(have):
            return False
        if have != wanted if isinstance(wanted, str) else not math.isclose(float(have), wanted):
            return False
    return True


def _pick(value: PublishedValue, rows: Sequence[Mapping[str, Any]], metric: str) -> tuple[float | None, str]:
    """The metric of the one row that matches; (None, why) when none or several do."""
    found = [row for row in rows if _matches(value, row) and not missing(row.get(metric))]
    if not found:
        return None, ""
    if len({row.get("run_id") for row in found}) > 1:
        return None, f"{len(found)} rows match {value.method}: name knob, batch_size or precision"
    return float(found[0][metric]), ""


def compare(published: Published, rows: Iterable[Mapping[str, Any]], extra_bytes: float = 0.0) -> list[Comparison]:
    """Every published value with the matching estimate row and measured row (rows of other methods are ignored).

    `extra_bytes` is added to every prediction (what the trace does not contain, e.g. cuBLAS workspaces).
    """
    rows = list(rows)
    predicted = [row for row in rows if row.get("memory_source") == ESTIMATE]
    measured = [row for row in rows if row.get("memory_source") not in (ESTIMATE, None)]
    scale = UNIT_BYTES[published.unit]
    out: list[Comparison] = []
    for value in published.values:
        guess, why_guess = _pick(value, predicted, published.metric)
        seen, why_seen = _pick(value, measured, published.metric)
        notes = [n for n in (value.note, why_guess, why_seen) if n]
        out.append(
            Comparison(
                method=value.method,
                label=value.label or value.method,
                published_bytes=value.value * scale,
                predicted_bytes=None if guess is None else guess + extra_bytes,
                measured_bytes=seen,
                note="; ".join(notes),
            )
        )
    return out


def mean_abs_deviation(
    comparisons: Iterable[Comparison], which: str = "predicted", exclude: Iterable[str] = ()
) -> float | None:
    """Mean of |published / ours − 1| over the comparisons that have a value (`which`: predicted or measured),
    leaving out the methods in `exclude`."""
    skip = set(exclude)
    ratios = [
        r
        for c in comparisons
        if c.method not in skip
        for r in [c.predicted_ratio if which == "predicted" else c.measured_ratio]
        if r is not None
    ]
    return sum(abs(r - 1.0) for r in ratios) / len(ratios) if ratios else None


def markdown_table(published: Published, comparisons: Sequence[Comparison]) -> str:
    """published / predicted / measured and their ratios, one method a row, in the published unit."""
    scale = UNIT_BYTES[published.unit]
    unit = published.unit

    def amount(value: float | None) -> str:
        return "-" if value is None else f"{value / scale:.2f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"| method | published ({unit}) | predicted ({unit}) | published / predicted "
        f"| measured ({unit}) | published / measured |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.label} | {amount(c.published_bytes)} | {amount(c.predicted_bytes)} | {ratio(c.predicted_ratio)} "
            f"| {amount(c.measured_bytes)} | {ratio(c.measured_ratio)} |"
        )
    return "\n".join(lines)
