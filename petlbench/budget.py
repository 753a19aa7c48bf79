"""Budgets: the CI gate. A YAML file of limits, a pure `check(results, budgets)`, and a baseline proposer.

A budget selects result rows (suite, tuner, knob, batch size, precision, device, ...) and bounds them:

    budgets:
      - select: {suite: smoke, tuner: lora, batch_size: 8, device: cpu}
        max_peak_allocated_bytes: 2.1MiB     # human units (KiB/MiB/GiB/TiB, KB/MB/GB/TB) or plain bytes
        max_params_trainable: 6794
        min_train_images_per_s: 900          # GPU rows only: CPU timings are too noisy for a gate
        min_acc_top1: 0.9                    # suites that train: final-epoch test accuracy (a fraction)
    ratios:
      - select: {tuner: linear}
        versus: {tuner: full}                # paired on suite/device/GPU/precision/batch/backbone/data/seed
        metric: peak_allocated_bytes
        max_ratio: 0.5                       # linear <= 0.5 x full: carries across GPU models

Every row a budget selects is checked; a row whose run did not end `ok` fails (its numbers are missing). A
budget that selects no row is a configuration error (exit 2): a silent budget is a bug.
"""

from __future__ import annotations

import math
import shlex
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeAlias, TypeVar, cast

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, create_model, model_validator

from petlbench.columns import Column, Kind, column, gated, limit_name
from petlbench.columns import format_value as format_column_value
from petlbench.errors import ConfigError
from petlbench.fmt import did_you_mean, first_line, fmt_bytes, missing, parse_bytes
from petlbench.report.rows import row_label, run_label, setting_label
from petlbench.spec.base import StrictModel
from petlbench.spec.loading import read_yaml
from petlbench.spec.messages import format_validation_error
from petlbench.spec.models import PAIR_COLUMNS, Device, Precision
from petlbench.system import safeio

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
OneOrMany: TypeAlias = T | list[T]
Op: TypeAlias = Literal["<=", ">="]

ByteCount: TypeAlias = Annotated[int, BeforeValidator(parse_bytes)]


# Measured, so empty on a run that failed before measuring: such a row still matches (and fails its checks),
# so a crashed tuner shows up as a FAIL naming the run instead of as a budget that selects nothing.
Row: TypeAlias = Mapping[str, Any]  # one result row, as check reads it (a dict of a normalised frame's row)


def _records(frame: pd.DataFrame) -> list[Row]:
    return cast(list[Row], frame.to_dict("records"))


_MEASURED_SELECTORS: Final = frozenset({"memory_source", "gpu_name"})
# selector field → result column
SELECTOR_COLUMNS: Final = {
    "suite": "suite",
    "tuner": "tuner",
    "method": "method",
    "knob": "knob",
    "batch_size": "batch_size",
    "precision": "precision",
    "device": "device",
    "backbone": "backbone.model",
    "grad_checkpointing": "grad_checkpointing",
    "gpu_name": "env.gpu_name",
    "memory_source": "memory_source",
}


class Selector(StrictModel):
    """Which result rows a budget applies to: every given field must match (a list means any of its values)."""

    suite: OneOrMany[str] | None = None
    tuner: OneOrMany[str] | None = None
    method: OneOrMany[str] | None = Field(None, description="tuner plus variant: vpt-deep, vpt-shallow, fact-tt, ...")
    knob: OneOrMany[float] | None = Field(None, description="the tuner's headline knob value (LoRA rank, ...)")
    batch_size: OneOrMany[int] | None = None
    precision: OneOrMany[Precision] | None = None
    device: OneOrMany[Device] | None = None
    backbone: OneOrMany[str] | None = Field(None, description="timm model name (backbone.model)")
    grad_checkpointing: bool | None = None
    gpu_name: OneOrMany[str] | None = Field(None, description="env.gpu_name, e.g. 'NVIDIA H100 80GB HBM3'")
    memory_source: OneOrMany[str] | None = Field(None, description="cpu_tracker, cuda_allocator or estimate")

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def describe(self) -> str:
        """'tuner=lora batch_size=8'."""
        parts = []
        for key, value in self.given().items():
            shown = ",".join(_show(v) for v in value) if isinstance(value, list) else _show(value)
            parts.append(f"{key}={shown}")
        return " ".join(parts) or "(all rows)"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# limit field → (result column, comparison): every column of the catalogue with a direction (petlbench/columns.py):
# `max_<column>` for lower-is-better columns, `min_<column>` for higher-is-better ones
LIMITS: Final[Mapping[str, tuple[str, Op]]] = {
    limit_name(c): (c.name, "<=" if c.better == "lower" else ">=") for c in gated()
}


def _limit_field(col: Column) -> tuple[Any, Any]:
    """The type of a budget's limit on `col`: bytes in human units, fractions in (0, 1], counts ≥ 0, rates > 0."""
    if col.kind == "bytes":
        return ByteCount | None, None
    if col.kind == "fraction":
        return float | None, Field(None, gt=0, le=1, description=f"{col.name} as a fraction (0.9 = 90%)")
    if col.dtype == "int":
        return int | None, Field(None, ge=0)
    return float | None, Field(None, gt=0)


if TYPE_CHECKING:
    _Limits = StrictModel
else:
    _Limits = create_model(
        "_Limits", __base__=StrictModel, **{f: _limit_field(column(c)) for f, (c, _) in LIMITS.items()}
    )


class Budget(_Limits):
    """Limits on every row `select` matches: any of `LIMITS` (max_peak_allocated_bytes, min_acc_top1, ...)."""

    name: str | None = None
    note: str | None = Field(None, description="why this limit; kept when the baseline is regenerated")
    select: Selector

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if all(getattr(self, field) is None for field in LIMITS):
            raise ValueError(f"give at least one limit: {', '.join(LIMITS)}")
        return self

    def limits(self) -> list[tuple[str, Op, float]]:
        """(column, comparison, limit) of every limit this budget sets."""
        return [(c, op, float(getattr(self, f))) for f, (c, op) in LIMITS.items() if getattr(self, f) is not None]


def _ratio_metric(value: str) -> str:
    numeric = {c.name for c in gated()}
    if value not in numeric:
        raise ValueError(
            f"{value!r} is not a measured column{did_you_mean(value, numeric) or ';'} valid: "
            + ", ".join(sorted(numeric))
        )
    return value


class RatioBudget(StrictModel):
    """`metric(row) / metric(versus row)` within bounds, for each selected row and its pair at the same settings."""

    name: str | None = None
    note: str | None = None
    select: Selector
    versus: Selector
    metric: Annotated[str, AfterValidator(_ratio_metric)] = "peak_allocated_bytes"
    max_ratio: float | None = Field(None, gt=0)
    min_ratio: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_bound(self) -> RatioBudget:
        if self.max_ratio is None and self.min_ratio is None:
            raise ValueError("give max_ratio, min_ratio or both")
        return self

    def label(self) -> str:
        return self.name or f"{self.select.describe()} vs {self.versus.describe()}"


class Budgets(StrictModel):
    """A budgets file."""

    budgets: list[Budget] = Field(default_factory=list)
    ratios: list[RatioBudget] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> Budgets:
        if not self.budgets and not self.ratios:
            raise ValueError("no budgets: give a `budgets:` or `ratios:` list")
        return self


def load_budgets(path: str | Path) -> Budgets:
    """Parse a budgets file; every problem is one line naming the file and the field."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return Budgets.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, str(path), Budgets))) from None


# ---------------------------------------------------------------------------------------------------------------
# Checking


@dataclass(frozen=True)
class CheckResult:
    """One row checked against one limit."""

    where: str  # budgets[2] / ratios[0]
    budget: str  # the budget's name ('' if unnamed); a ratio without a name: 'select vs versus'
    run_id: str
    row: str  # 'lora rank=8 bs=8'
    setting: str  # 'smoke fp32 cpu'
    metric: str  # result column, or 'peak_allocated_bytes ratio'
    kind: Kind
    op: Op
    limit: float
    actual: float | None
    passed: bool
    note: str = ""  # why a check failed without a value (run not ok, no partner, not measured)
    versus: str = ""  # ratios: the partner row's method ('full')


def select(frame: pd.DataFrame, selector: Selector) -> pd.DataFrame:
    """The rows of `frame` that `selector` matches."""
    import pandas as pd

    mask = pd.Series(True, index=frame.index)
    for key, wanted in selector.given().items():
        column = SELECTOR_COLUMNS[key]
        if column not in frame:
            mask &= False
            break
        hits = frame[column].isin(wanted if isinstance(wanted, list) else [wanted])
        if key in _MEASURED_SELECTORS:
            hits |= frame[column].isna() & (frame["status"] != "ok")
        mask &= hits
    selected: pd.DataFrame = frame[mask]
    return selected


def check(results: pd.DataFrame, budgets: Budgets, source: str = "budgets") -> list[CheckResult]:
    """Every (row, limit) pair the budgets select, passed or not. Rows must be normalised (`report.rows.normalise`).

    Raises ConfigError when a budget selects no row, or a ratio's `versus` is ambiguous (several pairs).
    """
    checks: list[CheckResult] = []
    problems: list[str] = []
    for i, budget in enumerate(budgets.budgets):
        where = f"budgets[{i}]"
        rows = select(results, budget.select)
        if rows.empty:
            problems.append(_no_match(source, where, budget.select, results))
            continue
        for row in _records(rows):  # plain dicts: a Series per row costs more than the check
            for name, op, limit in budget.limits():
                checks.append(_check_value(where, budget.name or "", row, name, column(name).kind, op, limit))
    for j, ratio in enumerate(budgets.ratios):
        where = f"ratios[{j}]"
        rows = select(results, ratio.select)
        if rows.empty:
            problems.append(_no_match(source, where, ratio.select, results, "select"))
            continue
        versus = select(results, ratio.versus)
        if versus.empty:
            problems.append(_no_match(source, where, ratio.versus, results, "versus"))
            continue
        partners = _Partners(versus)
        for row in _records(rows):
            pair = partners.of(row)
            if len(pair) > 1:
                problems.append(
                    f"{source}: {where}.versus: {len(pair)} rows ({', '.join(sorted(p['variant'] for p in pair))}) "
                    "pair with "
                    f"{row_label(row)}; narrow `versus` (e.g. add knob) so one row matches"
                )
                continue
            checks.extend(_check_ratio(where, ratio, row, pair[0] if pair else None))
    if problems:
        raise ConfigError("\n".join(problems))
    return checks


def _check_value(where: str, budget: str, row: Row, name: str, kind: Kind, op: Op, limit: float) -> CheckResult:
    value = row.get(name)
    actual = None if value is None or missing(value) else float(value)
    note = ""
    if row["status"] != "ok":
        # A failed run may have counted some things (parameters) before it ended; never compare those: the run's
        # outcome is the finding, and re-baselining would hide it.
        actual = None
        note = f"run ended {row['status']}: {first_line(row.get('error'), 100)}"
    elif actual is None:
        note = f"{name} was not measured"
    passed = not note and actual is not None and _within(actual, op, limit)
    return CheckResult(
        where,
        budget,
        str(row["run_id"]),
        run_label(row),
        setting_label(row),
        name,
        kind,
        op,
        limit,
        actual,
        passed,
        note,
    )


def _check_ratio(where: str, ratio: RatioBudget, row: Row, partner: Row | None) -> list[CheckResult]:
    metric = ratio.metric
    actual: float | None = None
    note = ""
    versus = str(partner["variant"]) if partner is not None else ratio.versus.describe()
    if row["status"] != "ok":
        note = f"run ended {row['status']}: {first_line(row.get('error'), 100)}"
    elif partner is None:
        note = f"no {ratio.versus.describe()} row at the same settings"
    elif partner["status"] != "ok":
        note = f"{partner['variant']} ended {partner['status']}"
    elif missing(row[metric]) or missing(partner[metric]) or float(partner[metric]) == 0:
        note = f"{metric} missing or zero"
    else:
        actual = float(row[metric]) / float(partner[metric])
    bounds: list[tuple[Op, float]] = []
    if ratio.max_ratio is not None:
        bounds.append(("<=", ratio.max_ratio))
    if ratio.min_ratio is not None:
        bounds.append((">=", ratio.min_ratio))
    return [
        CheckResult(
            where,
            ratio.label(),
            str(row["run_id"]),
            run_label(row),
            setting_label(row),
            f"{metric} ratio",
            "ratio",
            op,
            limit,
            actual,
            actual is not None and _within(actual, op, limit),
            note,
            versus,
        )
        for op, limit in bounds
    ]


def _within(actual: float, op: Op, limit: float) -> bool:
    return actual <= limit if op == "<=" else actual >= limit


class _Partners:
    """The `versus` rows of a ratio, indexed by their pairing columns: each selected row finds its partners in one
    lookup (a scan per row made a check of thousands of rows take minutes)."""

    def __init__(self, partners: pd.DataFrame) -> None:
        self.rows = _records(partners)
        self.names = [name for name in PAIR_COLUMNS if name in partners]
        self.index: dict[tuple[Any, ...], list[int]] = {}
        for position, values in enumerate(zip(*(partners[name] for name in self.names), strict=True)):
            self.index.setdefault(self._key(values), []).append(position)

    @staticmethod
    def _key(values: Iterable[Any]) -> tuple[Any, ...]:
        return tuple(None if missing(value) else value for value in values)

    def of(self, row: Row) -> list[Row]:
        """The partners of `row`: the same value (or both missing) in every pairing column, another run."""
        found = self.index.get(self._key(row.get(name) for name in self.names), [])
        return [self.rows[i] for i in found if self.rows[i]["run_id"] != row["run_id"]]


def _no_match(source: str, where: str, selector: Selector, results: pd.DataFrame, field: str = "select") -> str:
    hints = []
    for key, wanted in selector.given().items():
        column = SELECTOR_COLUMNS[key]
        present = sorted({_show(v) for v in results[column].dropna()}) if column in results else []
        values = wanted if isinstance(wanted, list) else [wanted]
        if not any(_show(v) in present for v in values):
            have = ", ".join(present) or "none"
            hints.append(f"no row has {key}={','.join(_show(v) for v in values)} (results have: {have})")
    hint = "; ".join(hints) if hints else "no row matches all fields together"
    return (
        f"{source}: {where}.{field}: selects no result row ({selector.describe()}): {hint}; "
        "fix the selector, run the missing runs, or delete the budget"
    )


# ---------------------------------------------------------------------------------------------------------------
# Baseline


@dataclass(frozen=True)
class Baseline:
    """A proposed budgets file: its text, and how many budgets and rows went into it."""

    text: str
    budgets: int
    ratios: int
    rows: int
    skipped: int  # rows not ok (oom/error/...): no budget proposed


def regenerate_command(paths: Sequence[Path], out: Path, headroom: float) -> str:
    """The command line that writes this baseline again."""
    args = ["petlbench", "check", *(str(p) for p in paths), "--write-baseline", str(out), "--headroom", f"{headroom:g}"]
    return shlex.join(args)


def propose_baseline(results: pd.DataFrame, headroom: float, command: str, keep: Budgets | None = None) -> Baseline:
    """One budget per measured configuration: max peak bytes × headroom, trainable params exact.

    Args:
        results: normalised rows (`report.rows.normalise`); only `ok` rows are budgeted.
        headroom: factor on bytes (e.g. 1.05); CPU bytes are deterministic, so a few percent is enough.
        command: the command that regenerates the file, written in its header.
        keep: an existing budgets file whose `ratios` (written by hand) are carried over.
    """
    if headroom < 1:
        raise ConfigError(f"--headroom: must be >= 1 (a budget below the measurement fails at once), got {headroom}")
    ok = results[results["status"] == "ok"]
    entries: dict[tuple[Any, ...], dict[str, Any]] = {}
    order = ["suite", "tuner", "method", "knob", "batch_size", "precision"]
    for _, row in ok.sort_values(order, na_position="first").iterrows():
        selector = _baseline_selector(row, ok)
        key = tuple(selector.items())
        entry = entries.setdefault(key, {"select": selector, "bytes": math.nan, "params": math.nan})
        entry["bytes"] = _nanmax(entry["bytes"], row["peak_allocated_bytes"])
        entry["params"] = _nanmax(entry["params"], row["params_trainable"])
    shas = sorted({str(s)[:10] for s in results.get("env.git_sha", []) if not missing(s)})
    lines = [
        "# petlbench budgets: limits `petlbench check --budgets FILE` enforces on result rows (exit 1 when over).",
        f"# Proposed from {len(ok)} ok result rows"
        + (f" (petlbench git {', '.join(shas)})" if shas else "")
        + f": peak bytes = measured × {headroom:g} (rounded up), trainable params exact.",
        f"# Regenerate: {command}",
        "# Fields: select (suite, tuner, method, knob, batch_size, precision, device, backbone, grad_checkpointing,",
        "# gpu_name, memory_source; a list means any of), then limits (bytes take units: 1.5GiB; accuracy is a",
        "# fraction):",
        *textwrap.wrap(", ".join(LIMITS), 110, initial_indent="#   ", subsequent_indent="#   "),
        "# ratios: select, versus, metric, max_ratio / min_ratio, paired on suite, device, GPU, precision,",
        "# batch size, backbone, data and seed.",
        "budgets:",
    ]
    for entry in entries.values():
        lines.append(f"  - select: {_flow(entry['select'])}")
        if not missing(entry["bytes"]):
            budget = math.ceil(entry["bytes"] * headroom)
            lines.append(
                f"    max_peak_allocated_bytes: {budget}  # {fmt_bytes(budget)}; measured {int(entry['bytes'])}"
            )
        if not missing(entry["params"]):
            lines.append(f"    max_params_trainable: {int(entry['params'])}")
    ratios = list(keep.ratios) if keep else []
    if ratios:
        lines.append("ratios:  # carried over from the previous file")
        dumped = [r.model_dump(mode="json", exclude_none=True) for r in ratios]
        text = yaml.safe_dump(dumped, sort_keys=False, default_flow_style=None, width=110)
        lines.extend("  " + line for line in text.rstrip().splitlines())
    text = "\n".join(lines) + "\n"
    Budgets.model_validate(yaml.safe_load(text))  # what we write must load
    return Baseline(text, len(entries), len(ratios), len(ok), len(results) - len(ok))


def _baseline_selector(row: pd.Series, ok: pd.DataFrame) -> dict[str, Any]:
    selector: dict[str, Any] = {"suite": row["suite"], "tuner": row["tuner"]}
    same_tuner = ok[(ok["suite"] == row["suite"]) & (ok["tuner"] == row["tuner"])]
    if row["method"] != row["tuner"] or same_tuner["method"].nunique() > 1:
        # `tuner: dtl` alone also selects the dtl+ rows: name the variant whenever the suite has several
        selector["method"] = row["method"]
    if not missing(row["knob"]):
        knob = float(row["knob"])
        selector["knob"] = int(knob) if knob.is_integer() else knob
    selector["batch_size"] = int(row["batch_size"])
    selector["precision"] = row["precision"]
    selector["device"] = row["device"]
    same_suite = ok[ok["suite"] == row["suite"]]
    for key in ("backbone", "grad_checkpointing"):
        column = SELECTOR_COLUMNS[key]
        if column in ok and same_suite[column].nunique(dropna=True) > 1:
            selector[key] = _plain(row[column])
    if row["device"] == "cuda" and not missing(row.get("env.gpu_name")):
        selector["gpu_name"] = row["env.gpu_name"]  # allocator peaks differ between GPU generations
    if not missing(row["memory_source"]):
        selector["memory_source"] = row["memory_source"]  # bytes from another accounting must not pass silently
    return selector


def _plain(value: Any) -> Any:
    """numpy scalars → Python, so YAML stays plain."""
    return value.item() if hasattr(value, "item") else value


def _flow(mapping: Mapping[str, Any]) -> str:
    plain = {key: _plain(value) for key, value in mapping.items()}
    text: str = yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=1000).strip()
    return text


def _nanmax(a: float, b: Any) -> float:
    if missing(b):
        return a
    return float(b) if missing(a) else max(a, float(b))


# ---------------------------------------------------------------------------------------------------------------
# Files in, results out (what the CLI calls)


@dataclass(frozen=True)
class CheckReport:
    """The outcome of checking a results folder against a budgets file."""

    checks: list[CheckResult]
    uncovered: list[str]  # labels of rows that no budget selects
    regenerate: str  # the command that writes a fresh baseline

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def failure_message(self, limit: int = 5) -> str:
        """Line 1: what failed (the first few); line 2, when a value is over its budget: how to accept it."""
        failed = self.failed
        shown = "; ".join(_failure_text(c) for c in failed[:limit])
        more = f"; and {len(failed) - limit} more" if len(failed) > limit else ""
        lines = [f"{len(failed)} check(s) failed: {shown}{more}"]
        if any(c.actual is not None and not c.note for c in failed):
            lines.append(f"if the increase is intended, regenerate the budgets and review the diff: {self.regenerate}")
        return "\n".join(lines)


def _failure_text(c: CheckResult) -> str:
    if c.actual is None or c.note:
        return f"{c.row} ({c.setting}) {c.metric}: {c.note or 'not measured'} ({c.where})"
    wrong = ">" if c.op == "<=" else "<"
    metric = f"{c.metric} vs {c.versus}" if c.versus else c.metric
    actual, limit = format_value(c.actual, c.kind), format_value(c.limit, c.kind)
    return f"{c.row} ({c.setting}) {metric} {actual} {wrong} {limit} ({c.where}, run {c.run_id})"


def format_value(value: float | None, kind: Kind) -> str:
    """A checked value in its unit, precise enough to compare with a tight budget: '3.28 MiB', '6,794', '0.29×'."""
    if value is None:
        return "-"
    if kind == "bytes":
        return fmt_bytes(value, digits=2)
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "rate":
        return f"{value:,.1f} img/s"
    return format_column_value(value, kind)


# What `check` reads of each row besides the selectors, the pairing columns and the limited metrics: the row's
# identity, outcome and label (petlbench.results.row_label), and what picks the newest row of a run.
LABEL_COLUMNS: Final = (
    *("run_id", "suite", "status", "error", "created_at", "tuner", "method", "knob_name", "knob"),
    *("batch_size", "precision", "device", "env.gpu_name", "memory_source", "variant"),
)


def columns_read(budgets: Budgets) -> list[str]:
    """The result columns checking `budgets` needs: only these are read from each file (thousands of files are
    checked in seconds)."""
    wanted = [*LABEL_COLUMNS, *SELECTOR_COLUMNS.values()]
    for budget in budgets.budgets:
        wanted += [name for name, _, _ in budget.limits()]
    if budgets.ratios:  # a ratio pairs rows on their settings
        wanted += [*PAIR_COLUMNS, *(ratio.metric for ratio in budgets.ratios)]
    return list(dict.fromkeys(wanted))


def check_files(paths: Sequence[Path], budgets_path: Path) -> CheckReport:
    """Load results and a budgets file, and check every budget (ConfigError if one selects nothing)."""
    from petlbench.report.rows import load_rows

    budgets = load_budgets(budgets_path)
    rows = load_rows(paths, columns_read(budgets))
    checks = check(rows, budgets, source=str(budgets_path))
    covered = {c.run_id for c in checks}
    left = rows[~rows["run_id"].isin(covered)]
    uncovered = [row_label(r) for r in left[list(LABEL_COLUMNS)].to_dict("records")]
    return CheckReport(
        checks, uncovered, _regenerate_line(budgets_path) or regenerate_command(paths, budgets_path, 1.05)
    )


def _regenerate_line(path: Path) -> str | None:
    """The command in a baseline file's '# Regenerate:' header line, if it has one."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# Regenerate: "):
            return line.removeprefix("# Regenerate: ").strip()
    return None


def write_baseline_file(paths: Sequence[Path], out: Path, headroom: float) -> tuple[Baseline, str]:
    """Propose budgets from the results under `paths` and write them to `out` (atomically).

    The ratios of an existing file at `out` are carried over (they are written by hand).
    Returns the baseline and the command that regenerates it.
    """
    from petlbench.report.rows import load_rows

    keep = None
    if out.exists():
        try:
            keep = load_budgets(out)
        except ConfigError as exc:
            raise ConfigError(f"{exc}\n{out}: --write-baseline keeps this file's ratios; fix it or delete it") from None
    rows = load_rows(paths)
    command = regenerate_command(paths, out, headroom)
    baseline = propose_baseline(rows, headroom, command, keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_text(out, baseline.text)  # a temp file renamed over `out`: never written through a link
    return baseline, command
