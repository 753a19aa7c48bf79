"""The guard on expensive CPU plans: before a `device: auto` suite runs on the CPU (no GPU here), predict whether
every run fits this machine's memory and how long the plan would take, and refuse what would not be sensible.

Torch-free, and quick (one estimate per backbone, in an estimator process: seconds): the backbone's heaviest run
(full fine-tuning where the suite has it, at its largest batch, fp32 first) is estimated on fake tensors; its peak
is checked against the machine's memory and its FLOPs per image (counted on the fake trace) stand in for every run
on that backbone (full fine-tuning does the most work, so the prediction errs long). Time = FLOPs of every step
the plan would run ÷ (this CPU's matmul rate × `EFFICIENCY`), plus a fixed cost per run. `EFFICIENCY` is the
share of matmul speed a ViT training step reaches on a CPU, calibrated on the quickstart (docs/measurement.md):
a rough number, which is fine for a guard whose limit is an hour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from petlbench.data.specs import DigitsData, ImageFolderData, SyntheticData, VtabData
from petlbench.errors import ConfigError
from petlbench.estimate.client import Estimate, run_estimates
from petlbench.fmt import fmt_bytes
from petlbench.spec.models import RunSpec

LIMIT_S: Final = 3600.0  # a CPU plan predicted longer than this is refused (use --device cpu to insist)
EFFICIENCY: Final = 0.4  # training-step FLOP/s ÷ matmul FLOP/s of a ViT on a CPU (calibrated on the quickstart)
RUN_OVERHEAD_S: Final = 4.0  # a worker process: imports, model build, shutdown
INFERENCE_SHARE: Final = 1 / 3  # a forward is about a third of a training step's FLOPs


@dataclass(frozen=True)
class PlanCost:
    """What the guard predicted for a plan."""

    seconds: float | None  # None when no configuration could be estimated
    largest_peak: int | None
    memory: int | None  # this machine's memory
    too_big: list[str]  # labels of runs predicted not to fit


def machine_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def train_images(spec: RunSpec) -> int:
    """Training images of one epoch (0 when the data's size is only known after indexing files)."""
    data = spec.data
    if isinstance(data, SyntheticData):
        return data.train_size
    if isinstance(data, DigitsData):
        return round(1797 * (1 - data.test_fraction))  # scikit-learn's digits
    if isinstance(data, VtabData):
        return {"train800val200": 1000, "train800": 800, "val200": 200}[data.train_split]
    if isinstance(data, ImageFolderData):
        return 0
    return 0


def images_per_run(spec: RunSpec) -> float:
    """Training-step images a run processes: warm-up, timed and tracked steps, inference forwards, training."""
    m = spec.measure
    steps = m.warmup_steps + m.steps + 1
    images = float(spec.batch_size * steps)
    if m.inference:
        images += spec.batch_size * (1 + m.steps) * INFERENCE_SHARE
    if spec.train is not None:
        epochs = spec.train.epochs
        per_epoch = train_images(spec)
        evals = epochs // (spec.train.eval_every or epochs) + 1
        images += epochs * per_epoch + evals * per_epoch * 0.25 * INFERENCE_SHARE  # test split ≈ a quarter
    return images


def _backbone_key(run: RunSpec) -> str:
    return run.backbone.model_dump_json() + run.data.model_dump_json()


def plan_cost(runs: Sequence[RunSpec], jobs: int = 1) -> PlanCost:
    """Predict the plan's largest peak and its time on this machine's CPU (one estimate per backbone)."""
    picks: dict[str, RunSpec] = {}
    for run in runs:
        key = _backbone_key(run)
        best = picks.get(key)
        rank = (run.tuner == "full", run.batch_size, run.precision == "fp32")
        if best is None or rank > (best.tuner == "full", best.batch_size, best.precision == "fp32"):
            picks[key] = run
    training_only = [
        p.model_copy(update={"measure": p.measure.model_copy(update={"inference": False})}) for p in picks.values()
    ]
    estimates = run_estimates(training_only, jobs=jobs)
    memory = machine_memory()
    largest: int | None = None
    too_big: list[str] = []
    per_image: dict[str, float] = {}
    rate: float | None = None
    for key, pick in zip(picks, training_only, strict=True):
        found: Estimate | None = estimates.get(pick.run_id)
        m = found.metrics if found is not None else None
        if found is None or m is None or m.peak_allocated_bytes is None:
            continue
        largest = max(largest or 0, m.peak_allocated_bytes)
        if memory is not None and m.peak_allocated_bytes > memory:
            too_big.append(pick.label())
        if m.step_flops:
            per_image[key] = m.step_flops / pick.batch_size
        value = found.env.get("matmul_flops_per_s")
        if isinstance(value, int | float) and value > 0:
            rate = max(rate or 0.0, float(value))
    if rate is None or not per_image:
        return PlanCost(None, largest, memory, too_big)
    seconds = 0.0
    for run in runs:
        flops = per_image.get(_backbone_key(run))
        if flops is not None:
            seconds += flops * images_per_run(run) / (rate * EFFICIENCY)
        seconds += RUN_OVERHEAD_S
    return PlanCost(seconds, largest, memory, too_big)


def check_cpu_plan(source: str, runs: Sequence[RunSpec], jobs: int = 1) -> PlanCost:
    """Refuse (ConfigError, exit 2) a CPU plan that would not fit this machine's memory or take over an hour."""
    cost = plan_cost(runs, jobs)
    problems = []
    if cost.too_big and cost.largest_peak is not None and cost.memory is not None:
        problems.append(
            f"its heaviest run ({cost.too_big[0]}) is predicted to need {fmt_bytes(cost.largest_peak)}, more than "
            f"this machine's {fmt_bytes(cost.memory)}"
        )
    if cost.seconds is not None and cost.seconds > LIMIT_S:
        problems.append(f"the plan is predicted to take {_duration(cost.seconds)} on this CPU")
    if problems:
        raise ConfigError(
            f"{source}: device auto runs on the CPU here (no GPU visible) and {'; '.join(problems)} "
            f"({len(runs)} runs); see `petlbench estimate {source}` for each run's prediction, or pass "
            "--device cpu to run it anyway"
        )
    return cost


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 48:
        return f"~{math.ceil(hours / 24)} days"
    return f"~{hours:.1f} h" if hours >= 1 else f"~{math.ceil(seconds / 60)} min"
