"""Expansion: a suite's lists and grids into a deterministic list of RunSpecs (one per run), each validated."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar, cast

from pydantic import BaseModel, ValidationError

from petlbench.data.specs import task_key
from petlbench.errors import ConfigError
from petlbench.spec.messages import format_validation_error, shown
from petlbench.spec.models import Device, OptimizerSpec, Precision, RunSpec, Suite, TrainSpec, TunerEntry, as_list
from petlbench.tuners import Tuner, available_tuners, unknown_tuner_message
from petlbench.tuners.base import unknown_knob_message

# The most runs one suite may expand to (docs/errors.md). Counted before any RunSpec is built, so a generated
# product of a million runs fails at once instead of after minutes and gigabytes.
MAX_RUNS: Final = 100_000


def expand(suite: Suite, device: Device, data_root: str | None = None) -> list[RunSpec]:
    """All runs of a suite, in a fixed order: backbone × data × tuner entry × grid point × precision × batch × ckpt
    × seed. `data_root` (the resolved --data-root) is carried to the workers; it is not part of any run_id.

    With `batch_size: auto` each configuration appears once, at `auto_batch.min`: the templates of the search
    (petlbench/estimate/autobatch.py), each itself the search's smallest probe.
    """
    fixed = cast(int | list[int], suite.batch_size)
    batch_sizes = [suite.batch_range.min] if suite.auto_batch_size else as_list(fixed)
    configs = available_tuners()
    datasets = suite.datasets()
    tasks = [task_key(d) for d in datasets]
    entries = [_check_entry(suite, entry, index, configs, tasks) for index, entry in enumerate(suite.tuners)]
    _check_run_count(suite, len(batch_sizes))
    runs: list[RunSpec] = []
    first_seen: dict[str, str] = {}
    for backbone in as_list(suite.backbone):
        for data, task in zip(datasets, tasks, strict=True):
            for index, (entry, (config_cls, optimizer, train)) in enumerate(zip(suite.tuners, entries, strict=True)):
                where = f"tuners[{index}]"
                per_task = entry.task_params.get(task, {})
                for point in _grid_points(entry.grid):
                    params = {**entry.params, **per_task, **point}
                    config = _tuner_config(config_cls, params, entry, suite.source, where, task)
                    for precision, batch_size, ckpt, seed in itertools.product(
                        cast(list[Precision], as_list(suite.precision)),
                        batch_sizes,
                        as_list(suite.grad_checkpointing),
                        as_list(suite.seed),
                    ):
                        run = RunSpec(
                            suite=suite.name,
                            device=device,
                            backbone=backbone,
                            data=data,
                            tuner=config.name,
                            tuner_params=config.model_dump(mode="json"),
                            method=config.method(),
                            knob_name=config.knob_name(),
                            knob=config.knob_value(),
                            batch_size=batch_size,
                            precision=precision,
                            grad_checkpointing=ckpt,
                            seed=seed,
                            optimizer=optimizer,
                            measure=suite.measure,
                            train=_trained(train, batch_size),
                            timeout_s=suite.timeout_s,
                            data_root=data_root,
                        )
                        run_id = run.run_id  # a hash of the whole spec: computed once
                        if run_id in first_seen:
                            raise ConfigError(
                                f"{suite.source}: {where}: repeats a run of {first_seen[run_id]} "
                                f"({run.label()}); remove the duplicate"
                            )
                        first_seen[run_id] = where
                        runs.append(run)
    return runs


def count_runs(suite: Suite, batch_sizes: int | None = None) -> int:
    """How many runs `expand` makes, from the list lengths alone (no RunSpec built)."""
    if batch_sizes is None:
        batch_sizes = 1 if suite.auto_batch_size else len(as_list(cast(int | list[int], suite.batch_size)))
    points = sum(math.prod(len(v) for v in entry.grid.values()) for entry in suite.tuners)
    precisions: list[Any] = as_list(cast(Any, suite.precision))
    per_point = len(precisions) * batch_sizes * len(as_list(suite.grad_checkpointing))
    return len(as_list(suite.backbone)) * len(suite.datasets()) * points * per_point * len(as_list(suite.seed))


def _check_run_count(suite: Suite, batch_sizes: int) -> None:
    total = count_runs(suite, batch_sizes)
    if total <= MAX_RUNS:
        return
    points = [math.prod(len(v) for v in entry.grid.values()) for entry in suite.tuners]
    biggest = max(range(len(points)), key=points.__getitem__)
    raise ConfigError(
        f"{suite.source}: expands to {total:,} runs, more than the {MAX_RUNS:,} a suite may have "
        f"(tuners[{biggest}].grid alone has {points[biggest]:,} points); shrink the grids and lists, or split the "
        "suite into several files"
    )


def _check_entry(
    suite: Suite, entry: TunerEntry, index: int, configs: Mapping[str, type[Tuner]], tasks: Sequence[str]
) -> tuple[type[Tuner], OptimizerSpec, TrainSpec | None]:
    """Validate what a tuner entry says beyond its knobs; return its config class, optimizer and train section."""
    where = f"tuners[{index}]"
    config_cls = configs.get(entry.tuner)
    if config_cls is None:
        raise ConfigError(f"{suite.source}: {where}.tuner: {unknown_tuner_message(entry.tuner, configs)}")
    for key, values in entry.grid.items():
        if not values:
            raise ConfigError(f"{suite.source}: {where}.grid.{key}: empty list; give at least one value")
        if key in entry.params:
            raise ConfigError(f"{suite.source}: {where}.grid.{key}: also set in params; keep one of the two")
    for task, params in entry.task_params.items():
        if task not in tasks:
            raise ConfigError(
                f"{suite.source}: {where}.task_params.{task}: no dataset of this suite is task {task!r}; "
                f"tasks here: {', '.join(dict.fromkeys(tasks))}"
            )
        for key in params:
            if key in entry.grid:
                raise ConfigError(
                    f"{suite.source}: {where}.task_params.{task}.{key}: also swept in grid; keep one of the two"
                )
    return config_cls, _merge_optimizer(suite, entry, where), _merge_train(suite, entry, where)


def _trained(train: TrainSpec | None, batch_size: int) -> TrainSpec | None:
    """The run's training section: none at a batch size `train.batch_sizes` leaves out; the list itself stays
    with the suite (so the run_ids of trained runs do not depend on it)."""
    if train is None or train.batch_sizes is None:
        return train
    return train.model_copy(update={"batch_sizes": None}) if batch_size in train.batch_sizes else None


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _tuner_config(
    config_cls: type[Tuner],
    params: dict[str, Any],
    entry: TunerEntry,
    source: str,
    where: str,
    task: str | None = None,
) -> Tuner:
    try:
        return config_cls.model_validate(params)
    except ValidationError as exc:
        lines = []
        per_task = entry.task_params.get(task, {}) if task is not None else {}
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            section = "grid" if field in entry.grid else f"task_params.{task}" if field in per_task else "params"
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            loc = f"{where}.{section}.{path}" if path else where  # a model-level error names the entry
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: {loc}: {unknown_knob_message(config_cls, field)}")
                continue
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            lines.append(f"{source}: {loc}: {msg}" + ("" if isinstance(got, dict) else f", got {shown(got)}"))
        raise ConfigError("\n".join(lines)) from None


_Section = TypeVar("_Section", bound=BaseModel)


def _override(base: _Section, overrides: dict[str, Any], source: str, where: str) -> _Section:
    """A suite section with a tuner entry's overrides applied, validated as a whole (errors name `where`)."""
    cls = type(base)
    try:
        return cls.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, source, cls, prefix=where))) from None


def _merge_optimizer(suite: Suite, entry: TunerEntry, where: str) -> OptimizerSpec:
    if not entry.optimizer:
        return suite.optimizer
    return _override(suite.optimizer, entry.optimizer, suite.source, f"{where}.optimizer")


def _merge_train(suite: Suite, entry: TunerEntry, where: str) -> TrainSpec | None:
    if not entry.train:
        return suite.train
    if suite.train is None:
        raise ConfigError(f"{suite.source}: {where}.train: the suite has no train section to override; add one")
    return _override(suite.train, entry.train, suite.source, f"{where}.train")
