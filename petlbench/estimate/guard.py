"""How long a CPU plan takes on this machine, and the guard that refuses a `device: auto` plan a CPU should not run.

The time model (docs/measurement.md, "How long a CPU plan takes"): a step costs a fixed CPU time per aten op plus
its FLOPs at a share of one core's matmul rate,

    step = OP_FACTOR × op_seconds × ops + FLOPs / (EFFICIENCY × matmul_rate)

where `ops` and `FLOPs` are counted on the fake-tensor trace of the run's own step (`step_ops`, `step_flops`) and
`op_seconds` and `matmul_rate` are measured on this CPU in CPU time by the estimator process (so a busy moment does
not skew them). A run adds up its steps — warm-up, timed, tracked, inference forwards (a third of a step),
training epochs and evaluations — plus a fixed cost per run and per training image (data loading). The plan's wall
time spreads the runs over the runs that go at once, slowed down by whatever else keeps the cores busy (the load
average): `max(1, (load + runs at once) / cores)`. OP_FACTOR, EFFICIENCY and the fixed costs are calibrated on
measured quickstart and smoke runs (their rows record duration, CPU time, load and runs in flight).

The guard (torch-free, a few seconds): the plan's heaviest run per backbone is estimated first; its peak is
checked against the machine's memory and its FLOPs bound the plan's time from above (every run as heavy) and
below (every run a third of it, a forward); only when the limit falls between the two bounds is every model
configuration estimated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from petlbench.data.specs import DigitsData, ImageFolderData, SyntheticData, VtabData
from petlbench.errors import ConfigError
from petlbench.estimate.client import Estimate, model_key, run_estimates
from petlbench.fmt import fmt_bytes, fmt_seconds
from petlbench.spec.models import RunSpec

LIMIT_S: Final = 3600.0  # a CPU plan predicted longer than this is refused (use --device cpu to insist)
# Calibrated on this project's 2-core development machine (docs/measurement.md): a least-squares fit of 60 measured
# quickstart and smoke runs' CPU time (`python scripts/cpu_time_fit.py`); every run's prediction fell within 0.54-1.22
# of its measurement.
OP_FACTOR: Final = 0.39  # CPU time of an aten op inside a training step ÷ that of a bare small op
EFFICIENCY: Final = 0.66  # FLOP rate a ViT step reaches ÷ one core's matmul rate
RUN_S: Final = 0.23  # per run (and per model built to train): fork, model build, environment, result
IMAGE_S: Final = 9.2e-4  # per training or test image: loading, resizing, the per-sample work of a step
SWEEP_S: Final = 6.0  # per plan: the fork server's imports and the pre-flight probe
REPORT_S_PER_RUN: Final = 0.65  # the report the quickstart writes at the end, per run in it
FORWARD_SHARE: Final = 1 / 3  # a forward is about a third of a training step (FLOPs and ops)
TRACKED_FACTOR: Final = 1.5  # the tracked step runs under the tensor tracker and the module tracker


@dataclass(frozen=True)
class Machine:
    """This CPU as the estimator measured it (CPU time, one core), and how busy it is."""

    matmul_rate: float  # FLOP/s of one core
    op_seconds: float  # CPU seconds of one small aten op
    cores: int
    load: float  # 1-minute load average before the plan starts

    @classmethod
    def measured(cls, env: Mapping[str, object]) -> Machine | None:
        rate, op = env.get("matmul_flops_per_s"), env.get("op_seconds")
        if not isinstance(rate, int | float) or not isinstance(op, int | float) or rate <= 0 or op <= 0:
            return None
        return cls(float(rate), float(op), available_cores(), load_average())


@dataclass(frozen=True)
class StepCost:
    """One training step of a model configuration: FLOPs per image and aten ops, from the fake trace."""

    flops_per_image: float
    ops: int

    @classmethod
    def of(cls, estimate: Estimate | None, batch: int) -> StepCost | None:
        m = estimate.metrics if estimate is not None else None
        if m is None or m.step_flops is None or m.step_ops is None:
            return None
        return cls(m.step_flops / batch, m.step_ops)


@dataclass(frozen=True)
class PlanCost:
    """What the guard predicted for a plan."""

    seconds: float | None  # wall time; None when no configuration could be estimated
    largest_peak: int | None
    memory: int | None  # this machine's memory
    too_big: list[str]  # labels of runs predicted not to fit
    parallel: int = 1
    load: float = 0.0
    bound: str = ""  # '' when every configuration was estimated; 'at least'/'at most' for a bound


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def machine_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def dataset_sizes(spec: RunSpec) -> tuple[int, int]:
    """(training images, test images) of the run's dataset (0 when only indexing the files would tell)."""
    data = spec.data
    if isinstance(data, SyntheticData):
        return data.train_size, data.test_size
    if isinstance(data, DigitsData):
        test = math.ceil(1797 * data.test_fraction)  # scikit-learn's digits
        return 1797 - test, test
    if isinstance(data, VtabData):
        train = {"train800val200": 1000, "train800": 800, "val200": 200}[data.train_split]
        return train, 0
    if isinstance(data, ImageFolderData):
        return 0, 0
    return 0, 0


def step_seconds(cost: StepCost, batch: int, machine: Machine) -> float:
    """CPU seconds of one training step at `batch` on one core."""
    return OP_FACTOR * machine.op_seconds * cost.ops + cost.flops_per_image * batch / (EFFICIENCY * machine.matmul_rate)


def run_seconds(spec: RunSpec, cost: StepCost, machine: Machine) -> float:
    """CPU seconds of one run: the worker's protocol (docs/measurement.md) step by step, plus its fixed costs."""
    m, b = spec.measure, spec.batch_size
    step = step_seconds(cost, b, machine)
    forward = FORWARD_SHARE * step
    protocol = m.timing

    def timed(each: float) -> int:  # timing goes on until min_steps and min_time_s are both reached
        wanted = max(protocol.min_steps, math.ceil(protocol.min_time_s / max(each, 1e-9)))
        return min(wanted, protocol.max_steps)

    seconds = RUN_S + (m.warmup_steps + timed(step) + TRACKED_FACTOR) * step
    if m.inference:
        seconds += (2 + timed(forward)) * forward
    if spec.train is not None:
        train, test = dataset_sizes(spec)
        per_epoch = train // b if spec.train.drop_last else math.ceil(train / b)
        every = spec.train.eval_every or spec.train.epochs
        evaluations = spec.train.epochs // every + (1 if spec.train.epochs % every else 0)
        eval_batch = spec.train.eval_batch_size or b
        seconds += spec.train.epochs * (per_epoch * step + train * IMAGE_S)
        seconds += evaluations * (
            math.ceil(test / eval_batch) * FORWARD_SHARE * step_seconds(cost, eval_batch, machine)
        )
        seconds += evaluations * test * IMAGE_S + RUN_S  # a second model is built to train
    return seconds


def plan_seconds(
    runs: Sequence[RunSpec], costs: Mapping[str, StepCost], machine: Machine, parallel: int, report: bool = False
) -> float | None:
    """Wall seconds of the plan: runs `parallel` at a time, slowed by the machine's other load, plus the sweep's
    start (and the report, for the quickstart). None when no run has a cost (`costs`: model_key → StepCost). A
    run's threads are not counted as a speed-up: the small models a CPU plan runs gain little from them."""
    total = 0.0
    known = False
    for run in runs:
        cost = costs.get(model_key(run))
        if cost is not None:
            total += run_seconds(run, cost, machine)
            known = True
    if not known:
        return None
    at_once = max(1, min(parallel, machine.cores))
    slowdown = max(1.0, (machine.load + at_once) / machine.cores)
    serial = SWEEP_S + (REPORT_S_PER_RUN * len(runs) if report else 0.0)
    return (total / at_once + serial) * slowdown


def _pick_heaviest(runs: Sequence[RunSpec]) -> dict[str, RunSpec]:
    """Per backbone, the run with the most work: full fine-tuning where there is one, at the largest batch."""
    picks: dict[str, RunSpec] = {}
    for run in runs:
        key = run.backbone.model_dump_json() + run.data.model_dump_json()
        best = picks.get(key)
        rank = (run.tuner == "full", run.batch_size, run.precision == "fp32")
        if best is None or rank > (best.tuner == "full", best.batch_size, best.precision == "fp32"):
            picks[key] = run
    return picks


def _training_only(spec: RunSpec) -> RunSpec:
    return spec.model_copy(update={"measure": spec.measure.model_copy(update={"inference": False})})


def plan_cost(runs: Sequence[RunSpec], parallel: int = 1, jobs: int = 1) -> PlanCost:
    """Predict the plan's largest peak and its wall time on this machine's CPU (`jobs`: estimator processes)."""
    picks = {key: _training_only(run) for key, run in _pick_heaviest(runs).items()}
    estimates = run_estimates(list(picks.values()), jobs=jobs)
    memory = machine_memory()
    largest: int | None = None
    too_big: list[str] = []
    machine: Machine | None = None
    heaviest: dict[str, StepCost] = {}
    for key, pick in picks.items():
        found = estimates.get(pick.run_id)
        m = found.metrics if found is not None else None
        if found is None or m is None or m.peak_allocated_bytes is None:
            continue
        largest = max(largest or 0, m.peak_allocated_bytes)
        if memory is not None and m.peak_allocated_bytes > memory:
            too_big.append(pick.label())
        machine = machine or Machine.measured(found.env)
        cost = StepCost.of(found, pick.batch_size)
        if cost is not None:
            heaviest[key] = cost
    if machine is None or not heaviest:
        return PlanCost(None, largest, memory, too_big, parallel)

    def backbone(run: RunSpec) -> str:
        return run.backbone.model_dump_json() + run.data.model_dump_json()

    heavy = {model_key(r): heaviest[backbone(r)] for r in runs if backbone(r) in heaviest}
    light = {key: replace(cost, flops_per_image=cost.flops_per_image * FORWARD_SHARE) for key, cost in heavy.items()}
    upper = plan_seconds(runs, heavy, machine, parallel)  # every run as heavy as the heaviest
    lower = plan_seconds(runs, light, machine, parallel)  # every run a forward of it
    base = PlanCost(None, largest, memory, too_big, parallel, machine.load)
    if lower is not None and lower > LIMIT_S:
        return replace(base, seconds=lower, bound="at least")
    if upper is not None and upper <= LIMIT_S and len({model_key(r) for r in runs}) > 40:
        return replace(base, seconds=upper, bound="at most")
    return replace(base, seconds=plan_seconds(runs, configuration_costs(runs, jobs), machine, parallel))


def configuration_costs(runs: Sequence[RunSpec], jobs: int = 1) -> dict[str, StepCost]:
    """model_key → the training step's cost, from one estimate per model configuration (at its smallest batch)."""
    firsts: dict[str, RunSpec] = {}
    for run in runs:
        key = model_key(run)
        if key not in firsts or run.batch_size < firsts[key].batch_size:
            firsts[key] = _training_only(run)
    estimates = run_estimates(list(firsts.values()), jobs=jobs)
    costs = {}
    for key, spec in firsts.items():
        cost = StepCost.of(estimates.get(spec.run_id), spec.batch_size)
        if cost is not None:
            costs[key] = cost
    return costs


def describe(cost: PlanCost, runs: int) -> str:
    """'~6 min 10 s on this CPU (28 runs, 2 at a time, load 0.3)'."""
    if cost.seconds is None:
        return f"no time prediction ({runs} runs)"
    bound = f"{cost.bound} " if cost.bound else "~"
    return (
        f"{bound}{fmt_seconds(cost.seconds)} on this CPU ({runs} runs, {cost.parallel} at a time, load {cost.load:.1f})"
    )


def check_cpu_plan(source: str, runs: Sequence[RunSpec], parallel: int = 1, jobs: int = 1) -> PlanCost:
    """Refuse (ConfigError, exit 2) a CPU plan that would not fit this machine's memory or take over an hour."""
    cost = plan_cost(runs, parallel, jobs)
    problems = []
    if cost.too_big and cost.largest_peak is not None and cost.memory is not None:
        problems.append(
            f"its heaviest run ({cost.too_big[0]}) is predicted to need {fmt_bytes(cost.largest_peak)}, more than "
            f"this machine's {fmt_bytes(cost.memory)}"
        )
    if cost.seconds is not None and cost.seconds > LIMIT_S:
        problems.append(f"the plan is predicted to take {describe(cost, len(runs))}")
    if problems:
        raise ConfigError(
            f"{source}: device auto runs on the CPU here (no GPU visible) and {'; '.join(problems)}; "
            f"`petlbench estimate {source} --device cpu` shows each run's prediction and the plan's time; "
            "--device cpu runs it anyway"
        )
    return cost
