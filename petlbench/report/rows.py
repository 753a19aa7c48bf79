"""Result rows as `report`, `check`, `compare` and `explain` read them, and the labels that name a row.

Parquet files written at different times (or with all-None columns) disagree on dtypes: a column that is None in
every row is stored as `object`, and concatenating files mixes ints, floats and None. Everything downstream wants
floats with NaN for 'not measured', so rows are coerced once, here, on the way in (`load_rows`); reading the files
and the schema check are petlbench.results'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petlbench.columns import numeric_columns, text_columns
from petlbench.errors import ResultsError
from petlbench.fmt import fmt_knob, missing, shown_path
from petlbench.results import load_results

if TYPE_CHECKING:
    import pandas as pd


def load_rows(paths: Iterable[Path], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every result row under `paths`, normalised (only `columns` read, when given: the others are added empty);
    a ResultsError when there is none."""
    paths = list(paths)
    frame = load_results(paths, columns)
    if frame.empty:
        where = ", ".join(shown_path(p) for p in paths) or "(no paths)"
        raise ResultsError(f"{where}: no result rows found; run `petlbench run SUITE` first")
    return normalise(frame)


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Coerce numeric columns, add missing ones, keep the newest row per run_id, and add a `variant` label."""
    import pandas as pd

    columns: dict[str, Any] = {name: frame[name] for name in frame.columns}
    for name in numeric_columns():
        values = frame[name] if name in frame else pd.Series(math.nan, index=frame.index)
        columns[name] = pd.to_numeric(values, errors="coerce").astype("float64")
    for name in text_columns():
        values = frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)
        columns[name] = values.astype(object).where(values.notna(), None)
    df = pd.DataFrame(columns, index=frame.index)  # built at once: adding columns one by one fragments the frame
    if df["run_id"].notna().all() and len(df):
        # One file per run_id in a folder, but two folders (or a copied file) can hold the same run: newest wins.
        df = df.sort_values("created_at", kind="stable", na_position="first")
        df = df.drop_duplicates("run_id", keep="last")
    methods = [m if m is not None else t for m, t in zip(df["method"], df["tuner"], strict=True)]
    variants = [variant_label(m, n, k) for m, n, k in zip(methods, df["knob_name"], df["knob"], strict=True)]
    result: pd.DataFrame = df.assign(method=methods, variant=variants).reset_index(drop=True)
    return result


def knob_text(name: Any, value: Any) -> str:
    """'rank=8', or '' for a tuner without a headline knob."""
    return "" if missing(name) or missing(value) else fmt_knob(str(name), float(value))


def variant_label(method: Any, knob_name: Any, knob: Any) -> str:
    """'lora rank=8' / 'vpt-deep prompt_len=50' / 'full': the method plus its headline knob, as figures name it."""
    knob = knob_text(knob_name, knob)
    return f"{method} {knob}" if knob else str(method)


def run_label(row: pd.Series | Mapping[str, Any]) -> str:
    """'lora rank=8 bs=8': the method and batch size of a row."""
    batch = row.get("batch_size")
    bs = "" if batch is None or missing(batch) else f" bs={int(batch)}"
    return f"{row.get('variant')}{bs}"


def setting_label(row: pd.Series | Mapping[str, Any]) -> str:
    """'smoke fp32 cpu' (or '... cuda NVIDIA H100 80GB HBM3'): where a row was measured."""
    gpu = row.get("env.gpu_name")
    extra = f" {gpu}" if row.get("device") == "cuda" and not missing(gpu) else ""
    return f"{row.get('suite')} {row.get('precision')} {row.get('device')}{extra}"


def row_label(row: pd.Series | Mapping[str, Any]) -> str:
    """'lora rank=8 bs=8 (smoke fp32 cpu)': enough to find the run."""
    return f"{run_label(row)} ({setting_label(row)})"
