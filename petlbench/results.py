"""Run results: the typed record a worker returns, its flat parquet row, and reading/writing results folders.

Storage is one parquet file per run, `results/<suite>/<run_id>.parquet`, written atomically (temp file, then
rename), so a crash or Ctrl-C never leaves half a file and a rerun resumes. Units in storage are bytes and
seconds; formatting belongs to reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict

from petlbench.columns import Metrics, declared
from petlbench.data.specs import data_label
from petlbench.errors import ResultsError, ResultsLocked, WriteError
from petlbench.fmt import describe_exception, missing
from petlbench.spec.models import ESTIMATE_SUFFIX, SCHEMA_VERSION, RunSpec
from petlbench.why import WhyData, save_why, why_path

if TYPE_CHECKING:
    import pandas as pd

Status: TypeAlias = Literal["ok", "oom", "error", "timeout", "skipped"]
EnvValue: TypeAlias = str | int | float | bool | None

# A rerun skips runs whose stored status is one of these; error/timeout/skipped runs are retried.
DONE_STATUSES: Final = frozenset({"ok", "oom"})
RESULT_SUFFIX: Final = ".parquet"


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
        undeclared = [name for name in row if not declared(name)]
        if undeclared:  # a programming error: every column is declared in petlbench/columns.py
            raise TypeError(f"result columns not in the catalogue (petlbench/columns.py): {', '.join(undeclared)}")
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


def stored_results(folder: Path) -> list[RunResult]:
    """Every row of one suite folder read back as a RunResult (spec, status, metrics; not env or timelines)."""
    if not folder.exists():
        return []
    frame = load_results([folder])
    if frame.empty or "spec_json" not in frame.columns:
        return []
    stored: list[RunResult] = []
    for row in frame.to_dict("records"):
        if not isinstance(row.get("spec_json"), str):
            continue
        values = {name: row[name] for name in Metrics.model_fields if name in row and not missing(row[name])}
        error, duration = row.get("error"), row.get("duration_s")
        stored.append(
            RunResult(
                spec=RunSpec.model_validate_json(row["spec_json"]),
                status=row["status"],
                error=error if isinstance(error, str) else None,
                metrics=Metrics.model_validate(values),
                created_at=str(row.get("created_at")),
                duration_s=float(duration) if isinstance(duration, int | float) and not missing(duration) else None,
            )
        )
    return stored


def summarize(results: Iterable[RunResult]) -> Mapping[str, int]:
    """Count of runs per status."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    return counts
