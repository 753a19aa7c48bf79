"""Print a papers suite's published numbers beside petlbench's estimate and measured rows, as markdown.

    python scripts/published_table.py suites/papers/dtl-figure.yaml results/dtl-figure.estimate [results/dtl-figure]

Predicted is the estimate row's `peak_allocated_bytes` (the caching-allocator model, workspaces included); the
last line gives the mean |published / predicted − 1| with that and with the trace alone (`mem_tracked_peak_bytes`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from petlbench.errors import ConfigError, PetlbenchError
from petlbench.report.published import compare, markdown_table, mean_abs_deviation
from petlbench.results import load_results
from petlbench.spec.loading import load_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("suite", type=Path, help="a suite with a `published:` block")
    parser.add_argument("folders", type=Path, nargs="+", help="result folders: its estimate and/or measured rows")
    parser.add_argument("--exclude", default="", help="methods left out of the mean, comma-separated (e.g. lst)")
    args = parser.parse_args(argv)
    try:
        suite = load_suite(args.suite)
        if suite.published is None:
            raise ConfigError(f"{args.suite}: published: the suite has no published numbers to compare with")
        rows = load_results(args.folders).to_dict("records")
    except PetlbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exclude = [m for m in args.exclude.split(",") if m]
    comparisons = compare(suite.published, rows)
    traced = [{**row, suite.published.metric: row.get("mem_tracked_peak_bytes")} for row in rows]
    print(markdown_table(suite.published, comparisons))
    left_out = f" other than {', '.join(exclude)}" if exclude else ""
    for name, found in (("allocator model", comparisons), ("trace alone", compare(suite.published, traced))):
        deviation = mean_abs_deviation(found, exclude=exclude)
        if deviation is not None:
            print(f"\nmean |published / predicted - 1|{left_out}, {name}: {deviation:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
