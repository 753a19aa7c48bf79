"""Fit the CPU time model's constants (petlbench/estimate/guard.py) to measured runs, and show how well it predicts.

    python scripts/cpu_time_fit.py RESULTS_DIR SUITE [RESULTS_DIR SUITE ...]

For each suite, RESULTS_DIR/SUITE/ holds measured CPU rows (one thread per run: `measure.cpu_threads: 1`, or
`--jobs` equal to the cores) and RESULTS_DIR/SUITE.estimate/ the estimate of the same runs (`petlbench estimate
SUITE --device cpu --results-dir RESULTS_DIR`), which carries each run's traced `step_ops` and `step_flops` and this
CPU's `op_seconds` and matmul rate. The model is linear in its constants, so they are a least-squares fit of each
run's measured CPU time (`cpu_time_s`, robust to other load); the table then compares predicted and measured CPU
time per run, and the script prints the constants to put in guard.py. Torch-free.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from petlbench.columns import Metrics
from petlbench.estimate import guard
from petlbench.estimate.client import Estimate
from petlbench.results import estimate_dir, load_results, stored_results, suite_dir
from petlbench.spec.models import RunSpec


def _rows(results: Path, suite: str) -> list[tuple[RunSpec, float, guard.StepCost, guard.Machine]]:
    measured = {r.run_id: r for r in stored_results(suite_dir(results, suite)) if r.metrics.cpu_time_s}
    estimates = load_results([estimate_dir(results, suite)])
    out = []
    for row in estimates.to_dict("records"):
        run = measured.get(str(row["run_id"]))
        if run is None or row.get("step_ops") is None:
            continue
        metrics = Metrics(step_ops=int(row["step_ops"]), step_flops=int(row["step_flops"]))
        cost = guard.StepCost.of(Estimate(run_id=run.run_id, metrics=metrics), run.spec.batch_size)
        env = {"matmul_flops_per_s": row["env.matmul_flops_per_s"], "op_seconds": row["env.op_seconds"]}
        machine = guard.Machine.measured(env)
        if cost is not None and machine is not None and run.metrics.cpu_time_s is not None:
            out.append((run.spec, run.metrics.cpu_time_s, cost, replace(machine, load=0.0)))
    return out


def _terms(spec: RunSpec, cost: guard.StepCost, machine: guard.Machine) -> list[float]:
    """The model's value split by constant: [ops term at OP_FACTOR=1, FLOPs term at EFFICIENCY=1, runs, images]."""
    base = {"OP_FACTOR": 1.0, "EFFICIENCY": 1.0, "RUN_S": 0.0, "IMAGE_S": 0.0}
    terms = []
    for name in base:
        values = dict.fromkeys(base, 0.0) | {"EFFICIENCY": 1e30}  # a term alone: the others off
        values[name] = 1.0
        with _constants(values):
            terms.append(guard.run_seconds(spec, cost, machine))
    return terms


class _constants:
    def __init__(self, values: dict[str, float]) -> None:
        self.values, self.saved = values, {k: getattr(guard, k) for k in values}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            setattr(guard, key, value)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            setattr(guard, key, value)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    data = [row for i in range(0, len(argv), 2) for row in _rows(Path(argv[i]), argv[i + 1])]
    if not data:
        print("no run has both a measured CPU time and an estimate", file=sys.stderr)
        return 2
    x = np.array([_terms(spec, cost, machine) for spec, _, cost, machine in data])
    y = np.array([measured for _, measured, _, _ in data])
    weights = 1.0 / y  # relative errors matter: a 1 s run and a 50 s run count alike
    fit, *_ = np.linalg.lstsq(x * weights[:, None], y * weights, rcond=None)
    op_factor, inverse_efficiency, run_s, image_s = (max(float(v), 0.0) for v in fit)
    constants = {
        "OP_FACTOR": op_factor,
        "EFFICIENCY": 1.0 / inverse_efficiency if inverse_efficiency > 0 else 1.0,
        "RUN_S": run_s,
        "IMAGE_S": image_s,
    }
    ratios = []
    with _constants(constants):
        print(f"{'run':<42} {'measured':>9} {'predicted':>9} {'ratio':>6}")
        for spec, measured, cost, machine in data:
            predicted = guard.run_seconds(spec, cost, machine)
            ratios.append(predicted / measured)
            label = f"{spec.suite} {spec.label()}"
            print(f"{label:<42} {measured:>8.2f}s {predicted:>8.2f}s {predicted / measured:>6.2f}")
    print(f"\n{len(data)} runs; predicted/measured CPU time: min {min(ratios):.2f}, max {max(ratios):.2f}")
    print("constants: " + ", ".join(f"{k} = {v:.3g}" for k, v in constants.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
