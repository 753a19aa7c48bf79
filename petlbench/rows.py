"""Result rows as `report` and `check` read them: numeric columns coerced, duplicate runs resolved, labels.

Parquet files written at different times (or with all-None columns) disagree on dtypes: a column that is None
in every row is stored as `object`, and concatenating files mixes ints, floats and None. Everything downstream
wants floats with NaN for 'not measured', so this module coerces once, at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from petlbench.errors import ResultsError
from petlbench.fmt import fmt_knob
from petlbench.results import load_results

if TYPE_CHECKING:
    import pandas as pd

# Columns read as numbers (NaN = not measured). Missing ones are added as all-NaN, so callers need no guards.
NUMERIC_COLUMNS: Final = (
    "knob",
    "batch_size",
    "params_total",
    "params_trainable",
    "params_added",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "peak_driver_bytes",
    "peak_infer_bytes",
    "mem_tracked_peak_bytes",
    "mem_weights_bytes",
    "mem_grads_bytes",
    "mem_optimizer_bytes",
    "mem_activations_bytes",
    "step_time_median_s",
    "train_images_per_s",
    "infer_images_per_s",
    "acc_top1",
    "acc_top1_best",
    "env.gpu_memory_bytes",
)
# Text columns every reader may use; missing ones are added as all-None.
TEXT_COLUMNS: Final = (
    "run_id",
    "suite",
    "status",
    "error",
    "created_at",
    "tuner",
    "method",
    "knob_name",
    "device",
    "precision",
    "memory_source",
    "attn_kernel",
)


def load_rows(paths: Iterable[Path]) -> pd.DataFrame:
    """Every result row under `paths`, normalised; a ResultsError when there is none."""
    paths = list(paths)
    frame = load_results(paths)
    if frame.empty:
        where = ", ".join(str(p) for p in paths) or "(no paths)"
        raise ResultsError(f"{where}: no result rows found; run `petlbench run SUITE` first")
    return normalise(frame)


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Coerce numeric columns, add missing ones, keep the newest row per run_id, and add a `variant` label."""
    import pandas as pd

    df = frame.copy()
    for column in NUMERIC_COLUMNS:
        df[column] = pd.to_numeric(df[column], errors="coerce") if column in df else math.nan
        df[column] = df[column].astype("float64")
    for column in TEXT_COLUMNS:
        if column not in df:
            df[column] = None
        df[column] = df[column].astype(object).where(df[column].notna(), None)
    if df["run_id"].notna().all() and len(df):
        # One file per run_id in a folder, but two folders (or a copied file) can hold the same run: newest wins.
        df = df.sort_values("created_at", kind="stable", na_position="first")
        df = df.drop_duplicates("run_id", keep="last")
    df["method"] = [m if m is not None else t for m, t in zip(df["method"], df["tuner"], strict=True)]
    df["variant"] = [variant_label(m, n, k) for m, n, k in zip(df["method"], df["knob_name"], df["knob"], strict=True)]
    result: pd.DataFrame = df.reset_index(drop=True)
    return result


def missing(value: Any) -> bool:
    """None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def knob_text(name: Any, value: Any) -> str:
    """'rank=8', or '' for a tuner without a headline knob."""
    return "" if missing(name) or missing(value) else fmt_knob(str(name), float(value))


def variant_label(method: Any, knob_name: Any, knob: Any) -> str:
    """'lora rank=8' / 'vpt-deep prompt_len=50' / 'full': the method plus its headline knob, as figures name it."""
    knob = knob_text(knob_name, knob)
    return f"{method} {knob}" if knob else str(method)


def run_label(row: pd.Series) -> str:
    """'lora rank=8 bs=8': the method and batch size of a row."""
    batch = row.get("batch_size")
    bs = "" if batch is None or missing(batch) else f" bs={int(batch)}"
    return f"{row.get('variant')}{bs}"


def setting_label(row: pd.Series) -> str:
    """'smoke fp32 cpu' (or '... cuda NVIDIA H100 80GB HBM3'): where a row was measured."""
    gpu = row.get("env.gpu_name")
    extra = f" {gpu}" if row.get("device") == "cuda" and not missing(gpu) else ""
    return f"{row.get('suite')} {row.get('precision')} {row.get('device')}{extra}"


def row_label(row: pd.Series) -> str:
    """'lora rank=8 bs=8 (smoke fp32 cpu)': enough to find the run."""
    return f"{run_label(row)} ({setting_label(row)})"


def first_line(text: Any, limit: int = 160) -> str:
    """The first line of an error message, shortened."""
    if missing(text) or not str(text).strip():
        return ""
    line = str(text).strip().splitlines()[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"
