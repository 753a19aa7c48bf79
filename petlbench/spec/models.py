"""The suite schema: typed models of a suite as written in YAML, and of one run (`RunSpec`).

A suite is parsed once, at the boundary (`petlbench.spec.loading`), into these frozen models with
`extra="forbid"`; everything after that works with `RunSpec`s only (`petlbench.spec.expand` makes them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeVar

from pydantic import Field, PrivateAttr, field_validator, model_validator

from petlbench.data.specs import DataSpec
from petlbench.spec import controls
from petlbench.spec.base import StrictModel

# Version of the RunSpec -> result-row schema. It is part of every run_id, so a schema change re-runs everything.
SCHEMA_VERSION: Final = 1

Precision: TypeAlias = Literal["fp32", "bf16-mixed", "fp16-mixed"]
Device: TypeAlias = Literal["cpu", "cuda"]
JSONScalar: TypeAlias = str | int | float | bool | None

T = TypeVar("T")


class BackboneSpec(StrictModel):
    """Which timm ViT to build and how."""

    model: str = Field("vit_base_patch16_224", description="timm model name (optionally with a .tag)")
    img_size: int | None = Field(None, gt=0, description="input resolution; None keeps the model's default")
    weights: str = Field(
        "random",
        description="'random' (no download), 'hub' (timm pretrained tag; needs network or a warm HF cache), "
        "or a path to a local checkpoint (.safetensors, .pth, .npz)",
    )
    fused_attn: bool = Field(True, description="timm fused attention (F.scaled_dot_product_attention) on or off")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after attention proj / MLP; 0 for memory runs")
    kwargs: dict[str, JSONScalar] = Field(
        default_factory=dict, description="extra timm.create_model keyword arguments (patch_size, depth, ...)"
    )

    @field_validator("kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value: dict[str, JSONScalar]) -> dict[str, JSONScalar]:
        reserved = {"pretrained", "num_classes", "img_size", "drop_path_rate", "drop_rate", "checkpoint_path"}
        clash = sorted(reserved & value.keys())
        if clash:
            raise ValueError(f"set {', '.join(clash)} as backbone fields, not in kwargs")
        return value


class OptimizerSpec(StrictModel):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="SGD only")
    # Explicit, because torch picks foreach on CUDA and single-tensor on CPU; foreach allocates a
    # params-sized temporary list at the step, so the default would make the two devices disagree.
    foreach: bool = False
    fused: bool = False

    @model_validator(mode="after")
    def _one_impl(self) -> OptimizerSpec:
        if self.foreach and self.fused:
            raise ValueError("foreach and fused cannot both be true")
        return self


class MeasureSpec(StrictModel):
    """The memory/speed protocol: warm-up steps, then measured steps, then one tracked breakdown step."""

    warmup_steps: int = Field(2, ge=2, description="AdamW creates its state on step 1; the steady peak is step ≥ 2")
    steps: int = Field(5, ge=1, description="measured training steps (timing, peaks)")
    breakdown: bool = Field(True, description="one extra step under the tensor tracker (weights/grads/opt/act)")
    inference: bool = Field(True, description="also measure inference peak and images/s")
    nvml_interval_ms: float = Field(5.0, gt=0, description="NVML sampling period during measured steps (GPU)")
    cpu_threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads of a CPU run (training included); None: torch's default, one per core. "
        "1 keeps tiny models fast on a shared machine, where spinning OpenMP threads stall each other",
    )
    # The timing protocol (docs/measurement.md): after the `steps` of the memory window, steps go on being timed
    # until both `steps` steps and `min_time_s` of step time are measured, at most `max_steps` in all. Unset, each
    # takes its default below (and stays out of the run_id: petlbench/spec/controls.py).
    min_time_s: float | None = Field(None, gt=0, description="time steps until this much step time is measured; 0.5")
    max_steps: int | None = Field(None, gt=0, description="at most this many timed steps in all; default 50")
    max_dispersion: float | None = Field(
        None, gt=0, description="flag a row's timing as unstable when IQR / median step time exceeds this; 0.1"
    )

    snapshot: bool | None = Field(
        None,
        description="CUDA only: record a memory snapshot (torch.cuda.memory._record_memory_history) of the tracked "
        "step, saved as results/<suite>/snapshots/<run_id>.pickle (open it at pytorch.org/memory_viz); off by default",
    )

    @property
    def timing(self) -> TimingProtocol:
        """The timing protocol with its defaults filled in."""
        return TimingProtocol(
            min_steps=self.steps,
            min_time_s=0.5 if self.min_time_s is None else self.min_time_s,
            max_steps=max(self.steps, 50 if self.max_steps is None else self.max_steps),
            max_dispersion=0.1 if self.max_dispersion is None else self.max_dispersion,
        )


@dataclass(frozen=True)
class TimingProtocol:
    """When to stop timing steps, and when their spread is too large to trust (MeasureSpec.timing)."""

    min_steps: int
    min_time_s: float
    max_steps: int
    max_dispersion: float


class TrainSpec(StrictModel):
    """The accuracy phase: train for `epochs` on the train split, evaluate top-1 on the test split."""

    epochs: int = Field(gt=0)
    eval_every: int | None = Field(None, gt=0, description="evaluate every N epochs (always after the last)")
    warmup_epochs: float = Field(0.0, ge=0, description="per-iteration linear warm-up")
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    drop_last: bool = Field(False, description="drop the last incomplete training batch (FacT: true, SQT: false)")
    eval_batch_size: int | None = Field(None, gt=0, description="test-split batch size; None: the run's batch size")
    batch_sizes: list[int] | None = Field(
        None,
        min_length=1,
        description="train only the runs at these batch sizes (the others are measured, not trained); None: all. "
        "A suite-level choice: runs do not carry it",
    )


class AutoBatchSpec(StrictModel):
    """The search range of `batch_size: auto`: the largest batch in [min, max] (a multiple of `multiple_of`) that fits
    the memory limit, seeded by the estimate and confirmed by real runs (petlbench/estimate/autobatch.py)."""

    min: int = Field(1, gt=0, description="smallest batch size tried")
    max: int = Field(4096, gt=0, description="largest batch size tried")
    multiple_of: int = Field(1, gt=0, description="only batch sizes that are multiples of this (e.g. 8 on GPUs)")

    @model_validator(mode="after")
    def _range(self) -> AutoBatchSpec:
        if self.max < self.min:
            raise ValueError(f"max must be >= min ({self.min}), got {self.max}")
        if self.min % self.multiple_of:
            raise ValueError(f"min must be a multiple of multiple_of ({self.multiple_of}), got {self.min}")
        if self.max < self.multiple_of:
            raise ValueError(f"max must be >= multiple_of ({self.multiple_of}), got {self.max}")
        return self


AUTO: Final = "auto"
# Estimate rows of suite X live in results/X.estimate/, so the name suffix is reserved (petlbench/estimate/client.py).
ESTIMATE_SUFFIX: Final = ".estimate"


class TunerEntry(StrictModel):
    """One tuner in a suite: fixed `params`, a `grid` of knob values to sweep, and optimizer overrides."""

    tuner: str
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    task_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-task knobs, keyed by data task (VTAB task name): override `params`"
    )
    optimizer: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite optimizer")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train section")


class PublishedValue(StrictModel):
    """One published number, and which of the suite's rows reproduce it."""

    method: str = Field(description="the rows' method, as tables name it: full, vpt-deep, fact-tk, dtl+, ...")
    value: float = Field(gt=0, description="the published number, in the block's unit")
    label: str | None = Field(None, description="what the source calls it, where that differs from `method`")
    knob: float | None = Field(None, description="only rows with this headline-knob value")
    batch_size: int | None = Field(None, gt=0, description="only rows of this batch size")
    precision: Precision | None = Field(None, description="only rows of this precision")
    note: str = Field("", description="what is particular to this number (e.g. code not published)")


class Published(StrictModel):
    """Numbers a paper or repository published for the runs a suite reproduces (suites/papers/)."""

    source: str = Field(description="paper and/or repository (with the commit) the numbers come from")
    where: str = Field(description="the figure or table, and how the numbers were read")
    metric: Literal["peak_allocated_bytes", "peak_reserved_bytes"] = Field(
        "peak_allocated_bytes", description="the result column the numbers correspond to"
    )
    unit: Literal["B", "KB", "MB", "GB", "KiB", "MiB", "GiB"] = Field(description="unit of every value")
    conditions: str = Field(description="the conditions the source states (model, batch, precision, GPU, ...)")
    assumed: str = Field(description="what the suite assumes where the source says nothing")
    values: list[PublishedValue] = Field(min_length=1)


def as_list(value: T | list[T]) -> list[T]:
    return value if isinstance(value, list) else [value]


class Suite(StrictModel):
    """A benchmark suite as written in YAML."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="results go to results/<name>/")
    description: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backbone: BackboneSpec | list[BackboneSpec] = Field(default_factory=BackboneSpec)
    data: DataSpec | list[DataSpec] = Field(description="a dataset, or a list of datasets to sweep")
    tuners: list[TunerEntry] = Field(min_length=1)
    batch_size: int | list[int] | Literal["auto"] = Field(
        32, description="a size, a list of sizes, or 'auto': the largest that fits the memory limit (see auto_batch)"
    )
    auto_batch: AutoBatchSpec | None = Field(None, description="search range for batch_size: auto")
    precision: Precision | list[Precision] = "fp32"
    grad_checkpointing: bool | list[bool] = False
    seed: int | list[int] = 0
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    train: TrainSpec | None = None
    timeout_s: float = Field(1800.0, gt=0, description="per-run wall-clock limit")
    published: Published | None = Field(None, description="published numbers these runs reproduce (suites/papers/)")

    _source: str = PrivateAttr(default="<suite>")

    @field_validator("backbone", "data", "batch_size", "precision", "grad_checkpointing", "seed")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("empty list; give at least one value")
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_shape(cls, value: Any) -> Any:
        # one clear line instead of one pydantic error per member of the union
        if isinstance(value, str) and value != AUTO:
            raise ValueError("must be a positive integer, a list of them, or 'auto'")
        if isinstance(value, list):
            if AUTO in value:
                raise ValueError("'auto' cannot be combined with other batch sizes; write batch_size: auto")
            for i, item in enumerate(value):
                if not isinstance(item, int) or isinstance(item, bool):
                    raise ValueError(f"must be a positive integer, a list of them, or 'auto'; item {i} is {item!r}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | list[int] | str) -> int | list[int] | str:
        if value == AUTO:
            return value
        for bs in as_list(value):
            if isinstance(bs, int) and bs <= 0:
                raise ValueError(f"must be > 0, got {bs}" if isinstance(value, list) else "must be > 0")
        return value

    @field_validator("name")
    @classmethod
    def _not_an_estimate_folder(cls, value: str) -> str:
        if value.endswith(ESTIMATE_SUFFIX):
            raise ValueError(f"names ending in {ESTIMATE_SUFFIX!r} are reserved for estimate results")
        return value

    @model_validator(mode="after")
    def _trained_batch_sizes(self) -> Suite:
        chosen = self.train.batch_sizes if self.train is not None else None
        if chosen is None:
            return self
        if self.batch_size == AUTO:
            raise ValueError("train.batch_sizes: not with batch_size: auto (the batch size is searched); remove it")
        swept = as_list(self.batch_size)
        unknown = [b for b in chosen if b not in swept]
        if unknown:
            raise ValueError(
                f"train.batch_sizes: {unknown} not among the suite's batch sizes {swept}; train at one of those"
            )
        return self

    @property
    def auto_batch_size(self) -> bool:
        """True for `batch_size: auto` (each configuration searches its own largest batch)."""
        return self.batch_size == AUTO

    @property
    def batch_range(self) -> AutoBatchSpec:
        """The auto-batch search range (defaults when the suite has no auto_batch section)."""
        return self.auto_batch or AutoBatchSpec()

    @property
    def source(self) -> str:
        return self._source

    def datasets(self) -> list[DataSpec]:
        """The suite's datasets as a list (`data` may be one spec or a list)."""
        return list(self.data) if isinstance(self.data, list) else [self.data]


class RunSpec(StrictModel):
    """Everything that changes a number. Parsed and validated; the worker receives it as JSON."""

    suite: str
    device: Device
    backbone: BackboneSpec
    data: DataSpec
    tuner: str
    tuner_params: dict[str, Any]
    method: str  # tuner plus a method-changing variant ('vpt-deep', 'fact-tk'): what tables and plots name
    knob_name: str | None
    knob: float | None
    batch_size: int = Field(gt=0)
    precision: Precision
    grad_checkpointing: bool
    seed: int
    optimizer: OptimizerSpec
    measure: MeasureSpec
    train: TrainSpec | None
    timeout_s: float = Field(gt=0)
    data_root: str | None = Field(None, description="resolved --data-root / $PETLBENCH_DATA_ROOT (execution-only)")

    @property
    def run_id(self) -> str:
        """Short hash of the canonical spec (execution-only fields excluded) and the schema version."""
        canonical = self.model_dump(mode="json", exclude=controls.run_id_exclusions(self))
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{text}|schema={SCHEMA_VERSION}".encode()).hexdigest()[:12]

    def label(self) -> str:
        """Human label: 'lora rank=8 bs=32 fp32'."""
        knob = f" {self.knob_name}={_fmt_num(self.knob)}" if self.knob_name is not None else ""
        return f"{self.method}{knob} bs={self.batch_size} {self.precision}"


def _fmt_num(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Result columns by role (petlbench/spec/controls.py): rows that differ in a GROUP column never share a figure,
# and a budget ratio pairs only rows equal in every PAIR column.
GROUP_COLUMNS: Final = controls.group_columns(RunSpec)
PAIR_COLUMNS: Final = controls.pair_columns(RunSpec)
