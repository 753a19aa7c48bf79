"""The fixed cost of a run outside its own measurement, per phase, for the spawn path and the fork server.

    PYTHONPATH=. python scripts/run_cost.py [RUNS] [spawn|fork ...]

(With PYTHONPATH pointing at an older checkout, `spawn` alone measures that checkout's spawn path.)

For each path, RUNS runs of one tiny spec (test_vit, 32 px, 2 steps) go through `run_in_subprocess`. Per run:
total wall time in the parent; `inside` = the worker's own `duration_s` (build + measurement); `before` = from
start to the worker's first log line (imports, or the fork); `after` = from the worker's last log line to the
parent seeing its exit (interpreter shutdown, or `os._exit`). Fixed cost = total - inside. Numbers in docs/scaling.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from petlbench.executors.local import log_path, run_in_subprocess
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite


def log_times(path: Path) -> tuple[float, float]:
    """Epoch seconds of the first and last timestamped line of a worker log."""
    stamps = []
    for line in path.read_text().splitlines():
        try:
            stamps.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
        except ValueError:
            continue
    return stamps[0], stamps[-1]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    paths = sys.argv[2:] or ["spawn", "fork"]
    suite = parse_suite(
        {
            "name": "cost",
            "device": "cpu",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": {"model": "test_vit", "img_size": 32, "kwargs": {"patch_size": 8, "depth": 3}},
            "batch_size": 8,
            "measure": {"warmup_steps": 2, "steps": 2, "inference": False},
            "tuners": [{"tuner": "lora"}],
        }
    )
    spec = expand(suite, "cpu")[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in paths:
            servers = None
            if name == "fork":
                from petlbench.executors.forkclient import ForkServers

                servers = ForkServers(dict(os.environ))
            if servers is not None:
                t0 = time.perf_counter()
                servers.get()
                print(f"fork server start (imports, once): {time.perf_counter() - t0:.2f} s")
            rows = []
            for _ in range(runs):
                start = time.time()
                kwargs = {"servers": servers} if servers is not None else {}
                result = run_in_subprocess(spec, Path(tmp), **kwargs)  # type: ignore[arg-type]
                end = time.time()
                first, last = log_times(log_path(Path(tmp), spec))
                assert result.status == "ok", result.error
                inside = result.duration_s or 0.0
                rows.append((end - start, inside, first - start, end - last, result.metrics.peak_allocated_bytes))
            if servers is not None:
                servers.close()
            total, inside, before, after = (statistics.median(r[i] for r in rows) for i in range(4))
            print(
                f"{name}: median of {runs} runs: total {total:.2f} s, inside {inside:.2f} s, "
                f"fixed {total - inside:.2f} s "
                f"(before the run {before:.2f} s, after it {after:.2f} s); peak bytes {sorted({r[4] for r in rows})}"
            )


if __name__ == "__main__":
    main()
