"""Run results: the typed record a worker returns, its flat parquet row, and reading/writing results folders.

Storage is one parquet file per run, `results/<suite>/<run_id>.parquet`, written atomically (temp file, then
rename), so a crash or Ctrl-C never leaves half a file and a rerun resumes. Units in storage are bytes and
seconds; formatting belongs to reports.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict

from petlbench.data.specs import data_label
from petlbench.errors import ResultsError, ResultsLocked, WriteError
from petlbench.fmt import describe_exception, fmt_knob, missing
from petlbench.measure.attribution import WhyData, save_why, why_path
from petlbench.spec.models import ESTIMATE_SUFFIX, SCHEMA_VERSION, RunSpec

if TYPE_CHECKING:
    import pandas as pd

Status: TypeAlias = Literal["ok", "oom", "error", "timeout", "skipped"]
EnvValue: TypeAlias = str | int | float | bool | None

# A rerun skips runs whose stored status is one of these; error/timeout/skipped runs are retried.
DONE_STATUSES: Final = frozenset({"ok", "oom"})
RESULT_SUFFIX: Final = ".parquet"


class Metrics(BaseModel):
    """Everything a run measures. None means 'not measured', never zero."""

    model_config = ConfigDict(extra="forbid")

    # parameters (counted structurally: added = parameters the tuner created)
    params_total: int | None = None
    params_trainable: int | None = None
    params_added: int | None = None
    weights_frozen_bytes: int | None = None
    weights_trainable_bytes: int | None = None
    # memory: the headline peak is `peak_allocated_bytes` (CUDA allocator, or the CPU tensor tracker)
    memory_source: str | None = None  # cuda_allocator | cpu_tracker | estimate
    # the limit a run was judged against (estimate FITS/OOM, run --skip-predicted-oom, batch_size: auto)
    memory_limit_bytes: int | None = None
    # estimates only (memory_source=estimate): True where a CPU→CUDA difference is not modelled (mixed precision,
    # attention dropout, foreach); `estimate_note` lists the deltas applied and what is approximate
    estimate_approximate: bool | None = None
    estimate_note: str | None = None
    step_flops: int | None = None  # estimates: FLOPs of one training step, counted on the fake trace
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_driver_bytes: int | None = None  # NVML, includes the CUDA context; never mixed into the headline
    driver_memory_scope: str | None = None  # process | device (device = whole GPU, when per-process is hidden)
    peak_infer_bytes: int | None = None
    peak_rss_bytes: int | None = None  # CPU: process peak RSS over the measured steps (after a reset)
    rss_baseline_bytes: int | None = None  # CPU: RSS when that peak was reset
    # breakdown of the tracked peak (one tracked step); the four categories sum to mem_tracked_peak_bytes
    mem_tracked_peak_bytes: int | None = None
    mem_weights_bytes: int | None = None
    mem_grads_bytes: int | None = None
    mem_optimizer_bytes: int | None = None
    mem_activations_bytes: int | None = None
    attn_kernel: str | None = None  # the attention op that actually ran (flash, efficient, cpu_flash, math, ...)
    # CUDA estimates: the card and allocator assumed (petlbench/estimate/gpus.py, petlbench/estimate/cuda_replay.py);
    # FITS = peak_reserved_bytes + context_bytes + headroom_bytes <= memory_limit_bytes
    gpu_preset: str | None = None  # the GPU a CUDA estimate assumed (preset key, or "custom")
    context_bytes: int | None = None  # memory outside the caching allocator on that GPU (an estimate)
    headroom_bytes: int | None = None  # margin kept free when judging FITS
    workspace_bytes: int | None = None  # cuBLAS/cuBLASLt workspaces held in training (one per thread's handle)
    infer_workspace_bytes: int | None = None  # the same, held during the inference forward
    attn_scratch_bytes: int | None = None  # the largest attention-backward scratch (transient, inside the op)
    alloc_conf: str | None = None  # the PYTORCH_CUDA_ALLOC_CONF the estimate assumed ("default" when unset)
    fits_json: str | None = None  # largest batch that fits, per GPU: JSON list of petlbench.estimate.gpus.FitSearch
    # speed
    step_time_median_s: float | None = None
    step_time_p90_s: float | None = None
    step_time_iqr_s: float | None = None  # interquartile range of the timed steps
    timed_steps: int | None = None
    timing_unstable: bool | None = None  # IQR / median above measure.max_dispersion: do not trust the speed
    train_images_per_s: float | None = None
    infer_time_median_s: float | None = None
    infer_images_per_s: float | None = None
    # accuracy
    acc_top1: float | None = None  # final-epoch top-1 on the test split
    acc_top1_best: float | None = None  # best over evaluations: test-selected (the papers' protocol)
    acc_best_epoch: int | None = None
    epochs: int | None = None
    train_time_s: float | None = None
    num_train: int | None = None
    num_test: int | None = None
    # identity: which weights and which data the run used (resolved in the worker; not part of the run_id)
    weights_source: str | None = None  # random | hub | file
    weights_ref: str | None = None  # hub repo (timm/<model>.<tag>) or the checkpoint's absolute path
    weights_sha256: str | None = None  # first 16 hex digits of the checkpoint file's sha256
    data_task: str | None = None  # VTAB task, ImageFolder task, or the dataset name
    data_train_split: str | None = None  # e.g. train800val200.txt, train/
    data_test_split: str | None = None  # e.g. test.txt, val/
    data_folder: str | None = None  # resolved task / ImageFolder folder
    data_fingerprint: str | None = None  # short sha256 of every (split, relative path, label)
    num_classes: int | None = None


class RunResult(BaseModel):
    """One run's outcome. Exactly one per RunSpec, whatever happened."""

    model_config = ConfigDict(extra="forbid")

    spec: RunSpec
    status: Status
    error: str | None = None
    error_type: str | None = None  # exception class of an error row (DataError, ConfigError, RuntimeError, ...)
    metrics: Metrics = Metrics()
    env: dict[str, EnvValue] = {}
    created_at: str
    duration_s: float | None = None
    # the tracked step's timeline and peak attribution; stored beside the row, not in it (write_result)
    why: WhyData | None = None
    # a CUDA memory snapshot of the tracked step (measure.snapshot): the worker's file, which the local executor
    # moves to results/<suite>/snapshots/<run_id>.pickle
    snapshot_file: str | None = None

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def to_row(self) -> dict[str, Any]:
        """Flat row: identity, spec fields (dotted), metrics, env.* — the parquet schema (README lists it)."""
        spec = self.spec
        row: dict[str, Any] = {
            "run_id": spec.run_id,
            "schema_version": SCHEMA_VERSION,
            "suite": spec.suite,
            "status": self.status,
            "error": self.error,
            "error_type": self.error_type,
            "created_at": self.created_at,
            "duration_s": self.duration_s,
            "tuner": spec.tuner,
            "method": spec.method,
            "knob_name": spec.knob_name,
            "knob": spec.knob,
            "device": spec.device,
            "batch_size": spec.batch_size,
            "precision": spec.precision,
            "grad_checkpointing": spec.grad_checkpointing,
            "seed": spec.seed,
            "dataset": data_label(spec.data),  # vtab1k/dtd: tasks are different datasets
            "timeout_s": spec.timeout_s,
        }
        for key, value in spec.tuner_params.items():
            row[f"tuner.{key}"] = _scalar(value)
        for section in ("backbone", "data", "optimizer", "measure", "train"):
            model = getattr(spec, section)
            if model is None:
                continue
            for key, value in model.model_dump(mode="json").items():
                row[f"{section}.{key}"] = _scalar(value)
        row.update(self.metrics.model_dump())
        for key, value in self.env.items():
            row[f"env.{key}"] = value
        row["spec_json"] = spec.model_dump_json()
        return row


def _scalar(value: Any) -> Any:
    """Parquet cells stay scalar: lists/dicts become canonical JSON strings."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True)
    return value


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def failed_result(spec: RunSpec, status: Status, error: str, duration_s: float | None = None) -> RunResult:
    """A row for a run that produced no result of its own (crash, timeout, skip)."""
    return RunResult(spec=spec, status=status, error=error, created_at=now_iso(), duration_s=duration_s)


# ---------------------------------------------------------------------------------------------------------------
# Files


def suite_dir(results_dir: Path, suite: str) -> Path:
    return results_dir / suite


def result_path(results_dir: Path, result: RunResult) -> Path:
    return suite_dir(results_dir, result.spec.suite) / f"{result.run_id}{RESULT_SUFFIX}"


def _unique_tmp(path: Path) -> Path:
    """A temp name no other writer uses (two processes writing the same run never share a temp file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _cannot_write(folder: Path, exc: OSError, what: str = "results") -> WriteError:
    reason = exc.strerror or describe_exception(exc)
    return WriteError(
        f"{folder}: cannot write {what} ({reason}); free space, fix its permissions or choose another folder"
    )


def check_writable(folder: Path, what: str = "results") -> None:
    """Create `folder` and write and remove a probe file in it, so an unwritable folder fails before any run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _unique_tmp(folder / ".write-check")
        probe.write_bytes(b"petlbench")
        probe.unlink()
    except OSError as exc:
        raise _cannot_write(folder, exc, what) from None


def write_result(results_dir: Path, result: RunResult) -> Path:
    """Write one run's row atomically; an existing file for the same run_id is replaced.

    Any OSError (disk full, read-only, a file where the folder should be) is a one-line WriteError naming the
    folder, and the temp file is removed: the folder then holds only whole result files.
    """
    import pandas as pd

    path = result_path(results_dir, result)
    tmp = _unique_tmp(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([result.to_row()]).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        timeline = why_path(path.parent, result.run_id)
        if result.why is not None:
            save_why(timeline, result.why)
        elif timeline.exists():  # a rerun without one: never leave the old run's timeline beside the new row
            timeline.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _cannot_write(path.parent, exc) from None
    return path


LOCK_NAME: Final = ".lock"


@contextlib.contextmanager
def results_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` (flock) for a sweep: a second `petlbench run` of the same suite refuses at once.

    The kernel drops the lock when the holder dies (even by kill -9), so a stale lock never blocks a rerun.
    """
    import fcntl

    check_writable(folder)
    lock_path = folder / LOCK_NAME
    try:
        handle = lock_path.open("a+")
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ResultsLocked(
                f"{folder}: another petlbench run (PID {holder}) is running this suite; wait for it to finish, or use "
                "another --results-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def estimate_dir(results_dir: Path, suite: str) -> Path:
    """Where `petlbench estimate` writes suite `suite`'s predictions: beside, never inside, its measured rows."""
    return results_dir / f"{suite}{ESTIMATE_SUFFIX}"


def result_files(paths: Iterable[Path]) -> list[Path]:
    """All result files under the given files/folders, sorted (deterministic).

    Estimate folders (`<suite>.estimate/`) below a given folder are left out, so reading `results/` never mixes
    predictions into measurements; name an estimate folder itself to read it.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in path.rglob(f"*{RESULT_SUFFIX}")
                if not p.name.startswith(".")
                and not any(part.endswith(ESTIMATE_SUFFIX) for part in p.relative_to(path).parts[:-1])
            )
        else:
            raise ResultsError(f"{path}: no such results file or folder; run `petlbench run SUITE` first")
    return sorted(files)


# Columns every results row has (what `RunResult.to_row` writes first). A parquet file without them is not a
# petlbench result (a stray file copied into the folder) and is refused, never read as a row.
ROW_COLUMNS: Final = ("run_id", "schema_version", "suite", "status")
_MOVE_OUT = "move it out of the results folder (or delete it to re-run that run)"


def _read(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """One results file, through the one schema check every command shares (report, check, run's planning,
    validate's stored statuses): readable parquet, the row columns present, a schema version this petlbench knows.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
        wanted = None if columns is None else list(dict.fromkeys([*ROW_COLUMNS, *columns]))
        missing_columns = [c for c in ROW_COLUMNS if c not in names]
        if missing_columns:
            raise ResultsError(
                f"{path}: not a petlbench results file (no {', '.join(missing_columns)} column); {_MOVE_OUT}"
            )
        if wanted is not None:
            wanted = [c for c in wanted if c in names]
        frame: pd.DataFrame = pd.read_parquet(path, columns=wanted)
    except ResultsError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ResultsError(
            f"{path}: unreadable results file ({describe_exception(exc)}); "
            "delete it to re-run that run, or move it out of the results folder"
        ) from None
    if len(frame):
        versions = pd.to_numeric(frame["schema_version"], errors="coerce")
        if versions.isna().any():
            raise ResultsError(f"{path}: schema_version is not a number; not a petlbench results file; {_MOVE_OUT}")
        version = int(versions.max())
        if version > SCHEMA_VERSION:
            raise ResultsError(
                f"{path}: written with result schema {version}, newer than this petlbench ({SCHEMA_VERSION}); "
                "upgrade petlbench to read it, or move it out of the results folder"
            )
    return frame


def load_results(paths: Iterable[Path]) -> pd.DataFrame:
    """Every row under the given results files/folders, as one DataFrame (empty if none)."""
    import pandas as pd

    frames = [_read(f) for f in result_files(paths)]
    frames = [f for f in frames if len(f)]
    combined: pd.DataFrame = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()
    return combined


def stored_statuses(folder: Path) -> dict[str, str]:
    """run_id → status of every result file in one suite folder (reads the row columns only)."""
    if not folder.exists():
        return {}
    statuses: dict[str, str] = {}
    for path in result_files([folder]):
        frame = _read(path, columns=["run_id", "status"])
        for run_id, status in zip(frame["run_id"], frame["status"], strict=True):
            statuses[str(run_id)] = str(status)
    return statuses


def summarize(results: Iterable[RunResult]) -> Mapping[str, int]:
    """Count of runs per status."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Rows as `report` and `check` read them
#
# Parquet files written at different times (or with all-None columns) disagree on dtypes: a column that is None
# in every row is stored as `object`, and concatenating files mixes ints, floats and None. Everything downstream
# wants floats with NaN for 'not measured', so rows are coerced once, at the boundary.

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
    "step_time_iqr_s",
    "train_images_per_s",
    "infer_images_per_s",
    "acc_top1",
    "acc_top1_best",
    "env.gpu_memory_bytes",
    "memory_limit_bytes",
    "context_bytes",
    "headroom_bytes",
    "workspace_bytes",
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
    "gpu_preset",
    "fits_json",
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
