"""The catalogue of result columns: every column a result row can hold, declared once, with what it means.

A result row (one parquet file per run) has four kinds of column, each declared here and nowhere else:
- identity and outcome (`run_id`, `status`, `error`, ...): `IDENTITY` below;
- the run's specification (`tuner`, `batch_size`, `backbone.model`, `tuner.rank`, ...): derived from `RunSpec`'s
  models, each field with its role from petlbench/spec/controls.py (a controlled variable, a recipe, ...);
- what a run measures or the estimator predicts (`peak_allocated_bytes`, `train_images_per_s`, ...): the fields of
  `Metrics`, each annotated with its `Col` (unit, format, which way is better, phase, role);
- the environment (`env.torch`, `env.gpu_name`, ...): `ENV` below.

Readers take names, units, formats and directions from here: the result schema check, report tables and axes,
`petlbench check` budgets (`max_<column>` / `min_<column>`), `petlbench compare` and the terminal tables. Adding a
metric is one `Metrics` field with its `Col`, plus the code that measures it; tests/test_columns.py fails when a
row carries a column declared nowhere, or a declared column is never written.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict

from petlbench.fmt import fmt_bytes, fmt_params, fmt_pct, fmt_rate, fmt_seconds, missing
from petlbench.spec.base import StrictModel

Dtype: TypeAlias = Literal["int", "float", "str", "bool"]
# How a value prints: bytes '1.5 GiB', count '85.88M', seconds '54.3 s', rate '1,234 img/s', fraction '93.1%',
# flops '2.1 TFLOP', load '3.20', ratio '0.53×', text and flag as they are.
Kind: TypeAlias = Literal["bytes", "count", "seconds", "rate", "fraction", "flops", "load", "ratio", "text", "flag"]
# identity: which run and how it ended; control: a field of the run's spec; measurement: measured by a run (the
# estimator may predict it: `memory_source` says which); prediction: only the estimator writes it; context: what
# the run ran on or beside (versions, load, resolved data and weights).
Role: TypeAlias = Literal["identity", "control", "measurement", "prediction", "context"]
Phase: TypeAlias = Literal["run", "spec", "build", "data", "memory", "speed", "accuracy", "estimate", "env"]
Better: TypeAlias = Literal["lower", "higher"] | None
# Where a column is written: every row, CUDA runs only, suites that train, file-based datasets, estimate rows,
# runs judged against a memory limit (estimate, --skip-predicted-oom, batch_size: auto), failed rows.
When: TypeAlias = Literal["always", "cuda", "cpu", "train", "files", "estimate", "limit", "failed", "measured"]


@dataclass(frozen=True)
class Col:
    """What a column means. Attached to a `Metrics` field (`Annotated[int | None, Col(...)]`) or declared in a list."""

    kind: Kind
    phase: Phase
    role: Role = "measurement"
    label: str = ""  # the short header tables use; default: the column name
    better: Better = None  # which way is better (budgets: `max_` for lower, `min_` for higher; compare's colours)
    when: When = "measured"
    description: str = ""


@dataclass(frozen=True)
class Column:
    """One column of a result row."""

    name: str
    dtype: Dtype
    col: Col

    @property
    def label(self) -> str:
        return self.col.label or self.name

    @property
    def kind(self) -> Kind:
        return self.col.kind

    @property
    def better(self) -> Better:
        return self.col.better

    def format(self, value: Any) -> str:
        """The value in this column's unit, as tables print it ('-' for not measured)."""
        return format_value(value, self.col.kind)


def format_value(value: Any, kind: Kind) -> str:
    if value is None or missing(value):
        return "-"
    formatter = _FORMATTERS.get(kind)
    return formatter(value) if formatter is not None else str(value)


def _flops(value: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} FLOP"


_FORMATTERS: Final[dict[Kind, Callable[[Any], str]]] = {
    "bytes": lambda v: fmt_bytes(float(v)),
    "count": lambda v: fmt_params(float(v)),
    "seconds": lambda v: fmt_seconds(float(v)),
    "rate": lambda v: fmt_rate(float(v)),
    "fraction": lambda v: fmt_pct(float(v)),
    "flops": lambda v: _flops(float(v)),
    "load": lambda v: f"{float(v):.2f}",
    "ratio": lambda v: f"{float(v):.3g}×",
    "flag": lambda v: "yes" if bool(v) else "no",
}


# ---------------------------------------------------------------------------------------------------------------
# What a run measures (or the estimator predicts)


def _c(kind: Kind, phase: Phase, **kw: Any) -> Col:
    return Col(kind, phase, **kw)


class Metrics(BaseModel):
    """Everything a run measures or the estimator predicts. None means 'not measured', never zero.

    Each field's `Col` is its catalogue entry. The headline memory is `peak_allocated_bytes` (the CUDA caching
    allocator's peak, or the CPU tensor tracker's exact peak: `memory_source`).
    """

    model_config = ConfigDict(extra="forbid")

    # parameters, counted structurally (added = parameters the tuner created)
    params_total: Annotated[int | None, _c("count", "build", label="params", when="always")] = None
    params_trainable: Annotated[int | None, _c("count", "build", label="trainable", better="lower", when="always")] = (
        None
    )
    params_added: Annotated[int | None, _c("count", "build", label="added", when="always")] = None
    weights_frozen_bytes: Annotated[int | None, _c("bytes", "build", label="frozen weights", when="always")] = None
    weights_trainable_bytes: Annotated[int | None, _c("bytes", "build", label="trainable weights", when="always")] = (
        None
    )
    # memory
    memory_source: Annotated[
        str | None,
        _c("text", "memory", label="source", description="cuda_allocator, cpu_tracker or estimate", when="always"),
    ] = None
    memory_limit_bytes: Annotated[
        int | None,
        _c(
            "bytes",
            "memory",
            role="context",
            label="limit",
            when="limit",
            description="the memory a measured run was judged against (--skip-predicted-oom, batch_size: auto)",
        ),
    ] = None
    peak_allocated_bytes: Annotated[int | None, _c("bytes", "memory", label="peak", better="lower")] = None
    peak_reserved_bytes: Annotated[int | None, _c("bytes", "memory", label="reserved", better="lower", when="cuda")] = (
        None
    )
    peak_driver_bytes: Annotated[
        int | None,
        _c(
            "bytes",
            "memory",
            label="driver",
            when="cuda",
            description="NVML, CUDA context included; never the headline",
        ),
    ] = None
    driver_memory_scope: Annotated[
        str | None, _c("text", "memory", label="driver scope", when="cuda", description="process or device")
    ] = None
    peak_infer_bytes: Annotated[int | None, _c("bytes", "memory", label="infer peak", better="lower")] = None
    peak_rss_bytes: Annotated[
        int | None, _c("bytes", "memory", label="peak RSS", when="cpu", description="process peak RSS (CPU)")
    ] = None
    rss_baseline_bytes: Annotated[int | None, _c("bytes", "memory", label="RSS at reset", when="cpu")] = None
    mem_tracked_peak_bytes: Annotated[int | None, _c("bytes", "memory", label="tracked peak")] = None
    mem_weights_bytes: Annotated[int | None, _c("bytes", "memory", label="weights")] = None
    mem_grads_bytes: Annotated[int | None, _c("bytes", "memory", label="grads")] = None
    mem_optimizer_bytes: Annotated[int | None, _c("bytes", "memory", label="optim")] = None
    mem_activations_bytes: Annotated[int | None, _c("bytes", "memory", label="activ.", better="lower")] = None
    attn_kernel: Annotated[
        str | None, _c("text", "memory", label="attention", description="the attention op that ran (flash, math, ...)")
    ] = None
    # the estimator's own
    estimate_approximate: Annotated[
        bool | None, _c("flag", "estimate", role="prediction", label="approximate", when="estimate")
    ] = None
    estimate_note: Annotated[str | None, _c("text", "estimate", role="prediction", label="note", when="estimate")] = (
        None
    )
    step_flops: Annotated[
        int | None, _c("flops", "estimate", role="prediction", label="FLOPs/step", when="estimate")
    ] = None
    # CUDA estimates: the card and the allocator assumed (petlbench/estimate/gpus.py, estimate/cuda_replay.py);
    # FITS = peak_reserved_bytes + context_bytes + headroom_bytes <= the card's memory
    gpu_preset: Annotated[
        str | None,
        _c(
            "text",
            "estimate",
            role="context",
            label="GPU",
            when="estimate",
            description="the GPU a CUDA estimate assumed",
        ),
    ] = None
    context_bytes: Annotated[
        int | None,
        _c(
            "bytes",
            "estimate",
            role="prediction",
            label="context",
            when="estimate",
            description="memory outside the caching allocator on that GPU (a per-preset estimate)",
        ),
    ] = None
    headroom_bytes: Annotated[
        int | None,
        _c(
            "bytes",
            "estimate",
            role="context",
            label="headroom",
            when="estimate",
            description="margin kept free when judging FITS",
        ),
    ] = None
    workspace_bytes: Annotated[
        int | None,
        _c(
            "bytes",
            "estimate",
            role="prediction",
            label="workspaces",
            when="estimate",
            description="cuBLAS/cuBLASLt workspaces held in training (one per thread's handle)",
        ),
    ] = None
    infer_workspace_bytes: Annotated[
        int | None,
        _c("bytes", "estimate", role="prediction", label="infer workspaces", when="estimate"),
    ] = None
    attn_scratch_bytes: Annotated[
        int | None,
        _c(
            "bytes",
            "estimate",
            role="prediction",
            label="attention scratch",
            when="estimate",
            description="the largest attention-backward scratch (transient, inside the op)",
        ),
    ] = None
    alloc_conf: Annotated[
        str | None,
        _c(
            "text",
            "estimate",
            role="context",
            label="allocator conf",
            when="estimate",
            description="the PYTORCH_CUDA_ALLOC_CONF assumed ('default' when unset)",
        ),
    ] = None
    fits_json: Annotated[
        str | None,
        _c(
            "text",
            "estimate",
            role="prediction",
            label="fits",
            when="estimate",
            description="the largest batch that fits, per GPU searched (JSON list)",
        ),
    ] = None
    step_ops: Annotated[
        int | None,
        _c("count", "estimate", role="prediction", label="ops/step", when="estimate", description="aten ops per step"),
    ] = None
    # speed
    step_time_median_s: Annotated[float | None, _c("seconds", "speed", label="step", better="lower")] = None
    step_time_p90_s: Annotated[float | None, _c("seconds", "speed", label="step p90", better="lower")] = None
    step_time_iqr_s: Annotated[float | None, _c("seconds", "speed", label="step IQR")] = None
    timed_steps: Annotated[int | None, _c("count", "speed", label="timed steps")] = None
    timing_unstable: Annotated[
        bool | None,
        _c("flag", "speed", label="unstable", description="IQR / median step time above measure.max_dispersion"),
    ] = None
    train_images_per_s: Annotated[float | None, _c("rate", "speed", label="img/s", better="higher")] = None
    infer_time_median_s: Annotated[float | None, _c("seconds", "speed", label="infer step", better="lower")] = None
    infer_images_per_s: Annotated[float | None, _c("rate", "speed", label="infer img/s", better="higher")] = None
    # accuracy (suites that train)
    acc_top1: Annotated[float | None, _c("fraction", "accuracy", label="acc", better="higher", when="train")] = None
    acc_top1_best: Annotated[
        float | None,
        _c("fraction", "accuracy", label="acc (best)", better="higher", when="train", description="test-selected"),
    ] = None
    acc_best_epoch: Annotated[int | None, _c("count", "accuracy", label="best epoch", when="train")] = None
    epochs: Annotated[int | None, _c("count", "accuracy", label="epochs", when="train")] = None
    train_time_s: Annotated[float | None, _c("seconds", "accuracy", label="train time", when="train")] = None
    num_train: Annotated[int | None, _c("count", "data", role="context", label="train images", when="always")] = None
    num_test: Annotated[int | None, _c("count", "data", role="context", label="test images", when="always")] = None
    # which weights and data the run used (resolved in the worker; not part of the run_id)
    weights_source: Annotated[
        str | None, _c("text", "build", role="context", label="weights", description="random, hub or file")
    ] = None
    weights_ref: Annotated[
        str | None, _c("text", "build", role="context", label="weights ref", when="files", description="hub or path")
    ] = None
    weights_sha256: Annotated[str | None, _c("text", "build", role="context", label="weights sha256", when="files")] = (
        None
    )
    data_task: Annotated[str | None, _c("text", "data", role="context", label="task", when="always")] = None
    data_train_split: Annotated[str | None, _c("text", "data", role="context", label="train split")] = None
    data_test_split: Annotated[str | None, _c("text", "data", role="context", label="test split")] = None
    data_folder: Annotated[str | None, _c("text", "data", role="context", label="data folder", when="files")] = None
    data_fingerprint: Annotated[str | None, _c("text", "data", role="context", label="data sha", when="files")] = None
    num_classes: Annotated[int | None, _c("count", "data", role="context", label="classes", when="always")] = None
    # the machine while the run ran (compare like with like: docs/measurement.md)
    cpu_time_s: Annotated[
        float | None,
        _c("seconds", "run", role="context", label="CPU time", description="the worker's user + system CPU time"),
    ] = None
    runs_in_flight: Annotated[
        int | None,
        _c("count", "run", role="context", label="in flight", description="runs executing at once (--jobs)"),
    ] = None
    load_avg_start: Annotated[
        float | None, _c("load", "run", role="context", label="load at start", description="1-min load average")
    ] = None
    load_avg_end: Annotated[
        float | None, _c("load", "run", role="context", label="load at end", description="1-min load average")
    ] = None


class FitSearch(StrictModel):
    """One entry of an estimate row's `fits_json`: the largest batch of one configuration predicted to fit one card
    (searched on the affine replay)."""

    gpu: str  # the card's label (preset key, or the memory of a custom card)
    memory_bytes: int
    max_batch: int | None  # None: not even the smallest batch allowed fits
    first_over: int | None  # the smallest batch that does not fit; None: the largest batch allowed fits
    reserved_bytes: int | None = None  # predicted max_memory_reserved at max_batch
    allocated_bytes: int | None = None  # predicted max_memory_allocated at max_batch
    required_bytes: int | None = None  # reserved + context + headroom at max_batch


# ---------------------------------------------------------------------------------------------------------------
# Identity and outcome, the spec, the environment

IDENTITY: Final = (
    Column("run_id", "str", Col("text", "run", role="identity", when="always")),
    Column("schema_version", "int", Col("count", "run", role="identity", when="always")),
    Column("suite", "str", Col("text", "run", role="identity", when="always")),
    Column("status", "str", Col("text", "run", role="identity", when="always")),
    Column("error", "str", Col("text", "run", role="identity", when="failed", description="first line: why")),
    Column("error_type", "str", Col("text", "run", role="identity", when="failed", label="error type")),
    Column("created_at", "str", Col("text", "run", role="identity", when="always", label="created")),
    Column("duration_s", "float", Col("seconds", "run", role="identity", when="always", label="took")),
    Column("spec_json", "str", Col("text", "spec", role="identity", when="always", description="the whole RunSpec")),
    # derived from the spec, for readers: `data_label(spec.data)`, the dataset a figure names
    Column("dataset", "str", Col("text", "spec", role="control", when="always")),
)

_ENV_TEXT: Final = (
    "petlbench",
    "python",
    "platform",
    "torch",
    "timm",
    "cuda",
    "git_sha",
    "cpu",
    "alloc_conf",
    "gpu_name",
    "gpu_capability",
    "cudnn",
    "driver",
    "cuda_visible_devices",
)
_ENV_CUDA: Final = frozenset(
    {
        "gpu_name",
        "gpu_memory_bytes",
        "gpu_capability",
        "cudnn",
        "cudnn_benchmark",
        "tf32_matmul",
        "tf32_cudnn",
        "sdpa_flash",
        "sdpa_mem_efficient",
        "sdpa_math",
        "driver",
        "cuda_visible_devices",
        "alloc_conf",
    }
)
ENV: Final = (
    *(
        Column(f"env.{key}", "str", Col("text", "env", role="context", when="cuda" if key in _ENV_CUDA else "always"))
        for key in _ENV_TEXT
    ),
    Column("env.git_dirty", "bool", Col("flag", "env", role="context", when="always")),
    Column("env.deterministic", "bool", Col("flag", "env", role="context", when="always")),
    Column("env.cpu_count", "int", Col("count", "env", role="context", when="always")),
    Column("env.torch_threads", "int", Col("count", "env", role="context", when="always")),
    Column("env.gpu_memory_bytes", "int", Col("bytes", "env", role="context", when="cuda", label="GPU memory")),
    *(
        Column(f"env.{key}", "bool", Col("flag", "env", role="context", when="cuda"))
        for key in ("cudnn_benchmark", "tf32_matmul", "tf32_cudnn", "sdpa_flash", "sdpa_mem_efficient", "sdpa_math")
    ),
    Column(
        "env.matmul_flops_per_s",
        "float",
        Col("rate", "env", role="context", when="estimate", description="one core's fp32 matmul rate (CPU time)"),
    ),
    Column(
        "env.op_seconds",
        "float",
        Col("seconds", "env", role="context", when="estimate", description="one core's CPU time per small aten op"),
    ),
)
# Columns named by a prefix: a tuner's knobs (`tuner.rank`), one per knob of whichever tuners a suite uses.
FAMILIES: Final = ("tuner.",)


def _dtype(annotation: Any) -> Dtype:
    """The stored type of a field: int, float, bool, str (lists, dicts and unions of models are JSON text)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _dtype(typing.get_args(annotation)[0])
    if origin in (tuple, list, dict):
        return "str"  # stored as canonical JSON text
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if origin is Literal:
        values = typing.get_args(annotation)
        return "str" if all(isinstance(v, str) for v in values) else "int"
    if len(members) == 1:
        member = members[0]
        if typing.get_origin(member) is Literal:
            return _dtype(member)
        if member is bool:
            return "bool"
        if member is int:
            return "int"
        if member is float:
            return "float"
    if set(members) <= {int, float}:
        return "float"
    return "str"


def _metric_columns() -> tuple[Column, ...]:
    columns = []
    for name, info in Metrics.model_fields.items():
        col = next((m for m in info.metadata if isinstance(m, Col)), None)
        if col is None:
            raise TypeError(f"Metrics.{name} has no Col: declare its unit, phase and role (petlbench/columns.py)")
        columns.append(Column(name, _dtype(info.annotation), col))
    return tuple(columns)


def _spec_columns() -> tuple[Column, ...]:
    from petlbench.data.specs import DigitsData, SyntheticData
    from petlbench.spec import controls
    from petlbench.spec.models import RunSpec

    columns = []
    excluded = {"tuner_params", "data_root", "suite"}  # tuner.* family; execution-only; an identity column
    in_memory = {*SyntheticData.model_fields, *DigitsData.model_fields}  # the rest are file-based datasets' fields
    for field in controls.spec_fields(RunSpec):
        if field in excluded or field.partition(".")[0] in excluded:
            continue
        annotation = controls.field_annotation(RunSpec, field)
        section, _, sub = field.partition(".")
        when: When = (
            "train" if section == "train" else "files" if section == "data" and sub not in in_memory else "always"
        )
        label = field.removeprefix("backbone.").removeprefix("measure.")
        kind: Kind = "count" if field == "batch_size" else "text"
        columns.append(Column(field, _dtype(annotation), Col(kind, "spec", role="control", when=when, label=label)))
    return tuple(columns)


@functools.cache
def catalogue() -> Mapping[str, Column]:
    """Every declared column by name (families such as `tuner.*` are matched by `declared`)."""
    columns = (*IDENTITY, *_spec_columns(), *_metric_columns(), *ENV)
    table: dict[str, Column] = {}
    for column in columns:
        if column.name in table:
            raise TypeError(f"result column {column.name!r} is declared twice")
        table[column.name] = column
    return table


def declared(name: str) -> bool:
    """Whether `name` is a column of the catalogue (or of a family: `tuner.rank`)."""
    return name in catalogue() or name.startswith(FAMILIES)


def column(name: str) -> Column:
    """The catalogue entry of a column; KeyError naming the catalogue for an undeclared one."""
    try:
        return catalogue()[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a result column; declare it in petlbench/columns.py") from None


def columns_where(predicate: Callable[[Column], bool]) -> tuple[Column, ...]:
    return tuple(c for c in catalogue().values() if predicate(c))


def numeric_columns() -> tuple[str, ...]:
    """Columns read as float64 (NaN = not measured) by every reader."""
    return tuple(c.name for c in catalogue().values() if c.dtype in ("int", "float") and c.name != "schema_version")


def text_columns() -> tuple[str, ...]:
    return tuple(c.name for c in catalogue().values() if c.dtype == "str")


def gated() -> tuple[Column, ...]:
    """Columns a budget can bound: measurements with a direction (`max_` for lower-is-better, `min_` for higher)."""
    chosen = columns_where(lambda c: c.better is not None and c.col.role in ("measurement", "prediction"))
    return tuple(sorted(chosen, key=lambda c: _PHASE_ORDER.index(c.col.phase)))  # stable: memory, params, ...


_PHASE_ORDER: Final[tuple[Phase, ...]] = (
    "memory",
    "build",
    "speed",
    "accuracy",
    "estimate",
    "data",
    "run",
    "spec",
    "env",
)


def limit_name(col: Column) -> str:
    """The budget field that bounds a column: 'max_peak_allocated_bytes', 'min_train_images_per_s'."""
    return ("max_" if col.better == "lower" else "min_") + col.name


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(float(value))
