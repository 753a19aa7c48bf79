"""Report data: rows split into groups that may share a figure, and one point per method × batch size.

Rows measured under different devices/GPUs, precisions, attention kernels, backbones, datasets or gradient
checkpointing settings answer different questions; a figure never mixes them. `split_groups` cuts the rows
along every such column that varies and names each group, so titles and file names say what was held fixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from petlbench.fmt import first_line, missing
from petlbench.report.identity import method_sort_key
from petlbench.spec.models import GROUP_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

# What a column is called in notes; every GROUP_COLUMNS entry (petlbench/spec/controls.py) splits figures.
_LABELS: Final = {
    "suite": "suite",
    "device": "device",
    "env.gpu_name": "GPU",
    "precision": "precision",
    "backbone.model": "backbone",
    "backbone.img_size": "image size",
    "backbone.kwargs": "backbone options",
    "backbone.fused_attn": "fused attention",
    "attn_kernel": "attention kernel",
    "grad_checkpointing": "gradient checkpointing",
}
FACETS: Final = (
    *((column, _LABELS.get(column, column)) for column in GROUP_COLUMNS),
    ("dataset", "dataset"),
    ("memory_source", "memory source"),  # a prediction never shares a figure with a measurement
    ("gpu_preset", "GPU assumed"),  # CUDA estimates for different cards never share a figure
)
# Facets the title names in its own words; any other facet that varies is added as `column=value`.
_TITLED: Final = frozenset(
    {"suite", "device", "env.gpu_name", "precision", "backbone.model", "backbone.img_size", "backbone.kwargs"}
    | {"backbone.fused_attn", "attn_kernel", "dataset", "grad_checkpointing", "memory_source", "gpu_preset"}
)
# Measured during the run, so missing on runs that failed early: borrowed from their ok siblings when unique.
_MEASURED: Final = ("attn_kernel", "env.gpu_name")
METRICS: Final = (
    "params_trainable",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "mem_tracked_peak_bytes",
    "mem_weights_bytes",
    "mem_grads_bytes",
    "mem_optimizer_bytes",
    "mem_activations_bytes",
    "train_images_per_s",
    "acc_top1",
    "acc_top1_best",
    "env.gpu_memory_bytes",
)


@dataclass(frozen=True)
class Group:
    """Rows that may share a figure: every facet column holds one value."""

    facets: dict[str, str]  # column → shown value
    rows: pd.DataFrame
    title: str  # 'smoke · cpu · fp32 · test_vit@32 · attn cpu_flash · synthetic'
    slug: str  # file-name part: 'smoke-cpu-fp32'

    @property
    def predicted(self) -> bool:
        """Every row is an estimate (`memory_source == "estimate"`): numbers are predictions, not measurements."""
        if "memory_source" not in self.rows or self.rows.empty:
            return False
        return bool((self.rows["memory_source"] == "estimate").all())

    @property
    def capacity(self) -> float | None:
        """The device's memory in bytes: what the GPU runs recorded, or for estimates the limit they were judged
        against (`memory_limit_bytes`)."""
        column = "memory_limit_bytes" if self.predicted else "env.gpu_memory_bytes"
        if column not in self.rows:
            return None
        values = self.rows[column].dropna()
        return float(values.max()) if len(values) else None

    @property
    def capacity_name(self) -> str:
        return "device memory" if self.predicted else "device capacity"

    def headline(self, text: str) -> str:
        """A figure title or table heading: 'Predicted ...' for estimates, so no one reads them as measured."""
        return f"Predicted {text[0].lower()}{text[1:]}" if self.predicted else text


def split_groups(rows: pd.DataFrame) -> tuple[list[Group], list[str]]:
    """Groups of rows that share every facet, and the names of the facets that varied (the reasons to split)."""
    df = _fill_measured(rows)
    columns = [c for c, _ in FACETS if c in df]
    keys = df[columns].map(_shown) if columns else df.iloc[:, :0]
    varying = [c for c in columns if keys[c].nunique() > 1]
    groups: list[Group] = []
    slugs: set[str] = set()
    if len(df):
        for key, index in keys.groupby(columns, sort=True, dropna=False).groups.items():
            values = dict(zip(columns, key if isinstance(key, tuple) else (key,), strict=True))
            slug = _unique(_slug(values, varying), slugs)
            groups.append(Group(values, df.loc[index], _title(values, varying), slug))
    names = dict(FACETS)
    return groups, [names[c] for c in varying]


def _fill_measured(rows: pd.DataFrame) -> pd.DataFrame:
    df = rows.copy()
    for column in _MEASURED:
        if column not in df or not df[column].isna().any():
            continue
        others = [c for c, _ in FACETS if c in df and c not in _MEASURED]
        for _, members in df.groupby([df[c].map(_shown) for c in others], sort=False, dropna=False):
            known = members.loc[members["status"] == "ok", column].dropna().unique()
            holes = members.index[members[column].isna()]
            if len(known) == 1 and len(holes):
                df.loc[holes, column] = known[0]
    filled: pd.DataFrame = df
    return filled


def _shown(value: Any) -> str:
    if missing(value):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _device(values: dict[str, str]) -> str:
    """The device a title names: the GPU that ran the rows, or the GPU preset a CUDA estimate assumed."""
    device = values.get("device", "-")
    if device == "cuda" and values.get("env.gpu_name", "-") != "-":
        return values["env.gpu_name"]
    if device == "cuda" and values.get("gpu_preset", "-") != "-":
        return values["gpu_preset"]
    return device


def _title(values: dict[str, str], varying: Sequence[str] = ()) -> str:
    get = values.get
    device = _device(values)
    backbone = get("backbone.model", "-")
    if get("backbone.img_size", "-") != "-":
        backbone += f"@{get('backbone.img_size')}"
    options = _kwargs_text(get("backbone.kwargs", "-"))
    if options:
        backbone += f" ({options})"
    attention = f"attn {get('attn_kernel', '-')}"
    if get("backbone.fused_attn") == "False":
        attention += " (timm unfused)"
    if get("memory_source") == "estimate" and device != "cpu":
        attention = ""  # the kernel the CPU trace ran is not the one a GPU would run
    parts = [get("suite", "-"), device, get("precision", "-"), backbone, attention, get("dataset", "-")]
    if get("grad_checkpointing") == "True":
        parts.append("grad ckpt")
    parts += [f"{column}={values[column]}" for column in varying if column not in _TITLED]
    return " · ".join(p for p in parts if p and p != "-")


def _kwargs_text(raw: str) -> str:
    if raw in ("-", "{}", ""):
        return ""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(parsed, dict):
        return raw
    return ", ".join(f"{k}={v}" for k, v in parsed.items())


def _slug(values: dict[str, str], varying: Sequence[str]) -> str:
    parts = [values.get("suite", "-"), _device(values), values.get("precision", "-")]
    shown = {"suite", "device", "env.gpu_name", "precision", "gpu_preset"}
    for column in varying:
        if column in shown:
            continue
        value = values[column]
        if column == "grad_checkpointing":
            value = "ckpt" if value == "True" else "no-ckpt"
        elif column == "backbone.fused_attn":
            value = "fused" if value == "True" else "unfused"
        elif column == "backbone.img_size":
            value = f"{value}px"
        parts.append(value)
    text = "-".join(p for p in parts if p != "-")
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "all"


def _unique(slug: str, taken: set[str]) -> str:
    candidate, n = slug, 2
    while candidate in taken:
        candidate, n = f"{slug}-{n}", n + 1
    taken.add(candidate)
    return candidate


def points(rows: pd.DataFrame) -> pd.DataFrame:
    """One point per (variant, batch size): metrics averaged over the ok runs (seeds); else the failure.

    Columns: variant, method, knob_name, knob, batch_size, status, runs (ok runs averaged), error, and METRICS.
    """
    import pandas as pd

    records: list[dict[str, Any]] = []
    for (variant, batch), members in rows.groupby(["variant", "batch_size"], sort=True, dropna=False):
        ok = members[members["status"] == "ok"]
        source = ok if len(ok) else members
        status = "ok" if len(ok) else _worst(members["status"])
        record: dict[str, Any] = {
            "variant": variant,
            "method": members["method"].iloc[0],
            "knob_name": members["knob_name"].iloc[0],
            "knob": members["knob"].iloc[0],
            "batch_size": batch,
            "status": status,
            "runs": len(ok),
            "error": "" if len(ok) else first_line(members["error"].iloc[0]),
        }
        for metric in METRICS:
            record[metric] = source[metric].mean() if metric in source else float("nan")
        # one unstable timing among the averaged runs makes the point's speed untrustworthy
        flags: Iterable[Any] = source.get("timing_unstable", [])
        record["timing_unstable"] = any(bool(f) for f in flags if not missing(f))
        records.append(record)
    columns = ["variant", "method", "knob_name", "knob", "batch_size", "status", "runs", "error", *METRICS]
    columns.append("timing_unstable")
    out: pd.DataFrame = pd.DataFrame.from_records(records, columns=columns)
    return out


def _worst(statuses: pd.Series) -> str:
    for status in ("oom", "timeout", "error", "skipped"):
        if (statuses == status).any():
            return status
    return str(statuses.iloc[0])


def variant_order(frame: pd.DataFrame) -> list[str]:
    """Variants sorted by method family (baselines, reparameterisation, prompts, adapters, side networks), then
    knob value (numerically): the same order in every figure and table."""
    pairs = frame[["variant", "method", "knob"]].drop_duplicates("variant")
    pairs = pairs.assign(_m=pairs["method"].map(lambda m: method_sort_key(str(m))), _k=pairs["knob"].fillna(-1.0))
    pairs = pairs.sort_values(["_m", "_k"])
    return [str(v) for v in pairs["variant"]]
