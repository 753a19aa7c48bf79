"""Suites: typed YAML in, a deterministic list of RunSpecs out.

A suite is parsed once, at the boundary, into frozen pydantic models with `extra="forbid"`; everything after
this module works with `RunSpec`s only. Lists in a suite (backbones, batch sizes, precisions, seeds, gradient
checkpointing, each tuner's `grid`) expand into their cartesian product in a fixed order, and each run gets a
`run_id` hashed from its canonical JSON plus the result schema version.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from petlbench.dataspec import ImageFolderData, VtabData, task_key
from petlbench.errors import ConfigError, DeviceError
from petlbench.tuners import TunerConfig, tuner_configs, unknown_tuner_message

# Version of the RunSpec -> result-row schema. It is part of every run_id, so a schema change re-runs everything.
SCHEMA_VERSION: Final = 1

Precision: TypeAlias = Literal["fp32", "bf16-mixed", "fp16-mixed"]
Device: TypeAlias = Literal["cpu", "cuda"]
JSONScalar: TypeAlias = str | int | float | bool | None

T = TypeVar("T")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneSpec(_Strict):
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


class SyntheticData(_Strict):
    """Random images and labels: for memory and speed only (accuracy is chance)."""

    name: Literal["synthetic"]
    num_classes: int = Field(100, gt=1)
    train_size: int = Field(512, gt=0)
    test_size: int = Field(128, gt=0)


class DigitsData(_Strict):
    """The 8×8 handwritten digits shipped inside scikit-learn (1,797 real images, 10 classes), resized."""

    name: Literal["digits"]
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share, stratified")
    split_seed: int = Field(0, description="seed of the train/test split (fixed across runs)")


DataSpec: TypeAlias = Annotated[SyntheticData | DigitsData | VtabData | ImageFolderData, Field(discriminator="name")]


class OptimizerSpec(_Strict):
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


class MeasureSpec(_Strict):
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


class TrainSpec(_Strict):
    """The accuracy phase: train for `epochs` on the train split, evaluate top-1 on the test split."""

    epochs: int = Field(gt=0)
    eval_every: int | None = Field(None, gt=0, description="evaluate every N epochs (always after the last)")
    warmup_epochs: float = Field(0.0, ge=0, description="per-iteration linear warm-up")
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    drop_last: bool = Field(False, description="drop the last incomplete training batch (FacT: true, SQT: false)")
    eval_batch_size: int | None = Field(None, gt=0, description="test-split batch size; None: the run's batch size")


class AutoBatchSpec(_Strict):
    """The search range of `batch_size: auto`: the largest batch in [min, max] (a multiple of `multiple_of`) that fits
    the memory limit, seeded by the estimate and confirmed by real runs (petlbench/autobatch.py)."""

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
# Estimate rows of suite X live in results/X.estimate/, so the name suffix is reserved (petlbench/prediction.py).
ESTIMATE_SUFFIX: Final = ".estimate"


class TunerEntry(_Strict):
    """One tuner in a suite: fixed `params`, a `grid` of knob values to sweep, and optimizer overrides."""

    tuner: str
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    task_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-task knobs, keyed by data task (VTAB task name): override `params`"
    )
    optimizer: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite optimizer")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train section")


def _as_list(value: T | list[T]) -> list[T]:
    return value if isinstance(value, list) else [value]


class Suite(_Strict):
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
        for bs in _as_list(value):
            if isinstance(bs, int) and bs <= 0:
                raise ValueError(f"must be > 0, got {bs}" if isinstance(value, list) else "must be > 0")
        return value

    @field_validator("name")
    @classmethod
    def _not_an_estimate_folder(cls, value: str) -> str:
        if value.endswith(ESTIMATE_SUFFIX):
            raise ValueError(f"names ending in {ESTIMATE_SUFFIX!r} are reserved for estimate results")
        return value

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


class RunSpec(_Strict):
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
        execution_only: Any = {"suite": True, "timeout_s": True, "data_root": True, "data": {"num_workers"}}
        if self.measure.cpu_threads is None:  # added later: unset, it leaves every earlier run_id unchanged
            execution_only["measure"] = {"cpu_threads"}
        canonical = self.model_dump(mode="json", exclude=execution_only)
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


# ---------------------------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (a silent last-one-wins is a typo magnet)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; every failure is a one-line ConfigError naming the file (and line)."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file; check the path (suites live in suites/*.yaml)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of suite fields, got {type(data).__name__}")
    return data


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file (tuner knobs included). Raises ConfigError with one line per problem."""
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    suite = parse_suite(raw, source=str(path))
    # Validate every tuner and knob now, so `validate` and `run` fail before any work starts.
    expand(suite, device="cpu")
    return suite


def parse_suite(raw: Mapping[str, Any], source: str = "<suite>") -> Suite:
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, source, Suite))) from None
    suite._source = source
    if suite.auto_batch is not None and not suite.auto_batch_size:
        raise ConfigError(
            f"{source}: auto_batch: only used with batch_size: auto, got batch_size {suite.batch_size!r}; "
            "remove auto_batch or set batch_size: auto"
        )
    return suite


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per pydantic error: 'file: loc.path: message, got value'.

    Fields typed `X | list[X]` make pydantic report one error per union member; the 'should be a list' one is
    noise when the other member explains the problem, so it is dropped.
    """
    entries: list[tuple[str, str, str]] = []  # (loc, error type, line)
    for err in exc.errors():
        loc = _format_loc(err["loc"], model, prefix)
        kind = err["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(model, err["loc"][:-1])
            hint = f"; valid keys: {', '.join(valid)}" if valid else ""
            entries.append((loc, kind, f"{source}: {loc}: unknown key{hint}"))
            continue
        if kind == "union_tag_invalid":
            ctx = err.get("ctx", {})
            field = f"{loc}.{ctx.get('discriminator', '').strip(chr(39))}"
            line = f"{source}: {field}: unknown value {ctx.get('tag')!r}; valid: {ctx.get('expected_tags')}"
            entries.append((loc, kind, line))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        show_got = kind != "missing" and not isinstance(got, dict | list)
        entries.append((loc, kind, f"{source}: {loc}: {msg}" + (f", got {got!r}" if show_got else "")))
    explained = [loc for loc, kind, _ in entries if kind != "list_type"]
    lines = []
    for loc, kind, line in entries:
        if kind == "list_type" and any(other == loc or other.startswith(loc + ".") for other in explained):
            continue
        if line not in lines:
            lines.append(line)
    return lines


def _format_loc(loc: tuple[int | str, ...], model: type[BaseModel], prefix: str) -> str:
    out = prefix
    tags = _union_tags(model, loc)
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i in tags:
            continue  # pydantic puts the union member (model name, tag, 'list[...]') in the loc; users never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _union_tags(model: type[BaseModel], loc: tuple[int | str, ...]) -> set[int]:
    """Indices in `loc` that name a union member rather than a field."""
    skip: set[int] = set()
    current: Any = model
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        current = _strip_none(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return skip
            current = _strip_none(field.annotation)
            continue
        if len(_flatten_annotation(current)) > 1:  # a union: this part names the member pydantic tried
            skip.add(i)
            current = _union_member(current, part)
            continue
        return skip
    return skip


def _strip_none(annotation: Any) -> Any:
    """`X | None` → X: pydantic validates optional fields without naming a union member in the error loc."""
    members = [m for m in _flatten_annotation(annotation) if m is not type(None)]
    return members[0] if len(members) == 1 and len(_flatten_annotation(annotation)) == 2 else annotation


def _union_member(annotation: Any, part: str) -> Any:
    for arg in _flatten_annotation(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            tag = arg.model_fields.get("name")
            if arg.__name__ == part or (tag is not None and part in typing.get_args(tag.annotation)):
                return arg
        elif part.startswith("list[") and typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return None


def _flatten_annotation(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _flatten_annotation(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _flatten_annotation(arg)]
    return [annotation]


def _valid_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model that `loc` points into (for 'unknown key' hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _strip_none(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _strip_none(current.model_fields[part].annotation)
        else:
            member = _union_member(current, part)
            if member is None:
                return []
            current = member
    members = _flatten_annotation(current)
    members += [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list]
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    return sorted(models[0].model_fields) if models else []


# ---------------------------------------------------------------------------------------------------------------
# Expansion


def expand(suite: Suite, device: Device, data_root: str | None = None) -> list[RunSpec]:
    """All runs of a suite, in a fixed order: backbone × data × tuner entry × grid point × precision × batch × ckpt
    × seed. `data_root` (the resolved --data-root) is carried to the workers; it is not part of any run_id.

    With `batch_size: auto` each configuration appears once, at `auto_batch.min`: the templates of the search
    (petlbench/autobatch.py), each itself the search's smallest probe.
    """
    fixed = cast(int | list[int], suite.batch_size)
    batch_sizes = [suite.batch_range.min] if suite.auto_batch_size else _as_list(fixed)
    configs = tuner_configs()
    datasets = suite.datasets()
    tasks = [task_key(d) for d in datasets]
    entries = [_check_entry(suite, entry, index, configs, tasks) for index, entry in enumerate(suite.tuners)]
    runs: list[RunSpec] = []
    first_seen: dict[str, str] = {}
    for backbone in _as_list(suite.backbone):
        for data, task in zip(datasets, tasks, strict=True):
            for index, (entry, (config_cls, optimizer, train)) in enumerate(zip(suite.tuners, entries, strict=True)):
                where = f"tuners[{index}]"
                per_task = entry.task_params.get(task, {})
                for point in _grid_points(entry.grid):
                    params = {**entry.params, **per_task, **point}
                    config = _tuner_config(config_cls, params, entry, suite.source, where, task)
                    for precision, batch_size, ckpt, seed in itertools.product(
                        cast(list[Precision], _as_list(suite.precision)),
                        batch_sizes,
                        _as_list(suite.grad_checkpointing),
                        _as_list(suite.seed),
                    ):
                        run = RunSpec(
                            suite=suite.name,
                            device=device,
                            backbone=backbone,
                            data=data,
                            tuner=config.name,
                            tuner_params=config.model_dump(mode="json"),
                            method=config.method(),
                            knob_name=config.knob,
                            knob=config.knob_value(),
                            batch_size=batch_size,
                            precision=precision,
                            grad_checkpointing=ckpt,
                            seed=seed,
                            optimizer=optimizer,
                            measure=suite.measure,
                            train=train,
                            timeout_s=suite.timeout_s,
                            data_root=data_root,
                        )
                        if run.run_id in first_seen:
                            raise ConfigError(
                                f"{suite.source}: {where}: repeats a run of {first_seen[run.run_id]} "
                                f"({run.label()}); remove the duplicate"
                            )
                        first_seen[run.run_id] = where
                        runs.append(run)
    return runs


def _check_entry(
    suite: Suite, entry: TunerEntry, index: int, configs: Mapping[str, type[TunerConfig]], tasks: Sequence[str]
) -> tuple[type[TunerConfig], OptimizerSpec, TrainSpec | None]:
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


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _tuner_config(
    config_cls: type[TunerConfig],
    params: dict[str, Any],
    entry: TunerEntry,
    source: str,
    where: str,
    task: str | None = None,
) -> TunerConfig:
    try:
        return config_cls.model_validate(params)
    except ValidationError as exc:
        lines = []
        per_task = entry.task_params.get(task, {}) if task is not None else {}
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            section = "grid" if field in entry.grid else f"task_params.{task}" if field in per_task else "params"
            loc = f"{where}.{section}.{'.'.join(str(p) for p in err['loc'])}"
            if err["type"] == "extra_forbidden":
                lines.append(
                    f"{source}: {loc}: unknown knob for tuner {entry.tuner!r}; "
                    f"valid: {', '.join(config_cls.model_fields) or '(none)'}"
                )
                continue
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {loc}: {msg}, got {err.get('input')!r}")
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


def resolve_device(requested: str, gpus: Sequence[str]) -> Device:
    """'auto' → cuda when a GPU is visible, else cpu; 'cuda' without a GPU is a DeviceError."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not gpus:
            raise DeviceError(
                "device cuda: no NVIDIA GPU is visible (NVML found none, or CUDA_VISIBLE_DEVICES hides them); "
                "use --device cpu"
            )
        return "cuda"
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    raise DeviceError(f"device {requested!r}: expected auto, cpu or cuda")
