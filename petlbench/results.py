"""Run results: the typed record a worker returns, its flat parquet row, and reading/writing results folders.

Storage is one parquet file per run, `results/<suite>/<run_id>.parquet`, written atomically (temp file, then
rename), so a crash or Ctrl-C never leaves half a file and a rerun resumes. Units in storage are bytes and
seconds; formatting belongs to reports.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, ValidationError

from petlbench.columns import Metrics, catalogue, declared
from petlbench.data.specs import data_label
from petlbench.errors import ResultsError, ResultsLocked, WriteError
from petlbench.fmt import describe_exception, missing, shown_path
from petlbench.spec.models import ESTIMATE_SUFFIX, SCHEMA_VERSION, RunSpec
from petlbench.system import ledger, safeio
from petlbench.why import WhyData, save_why, why_path

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

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


def _cannot_write(folder: Path, exc: OSError, what: str = "results") -> WriteError:
    if safeio.is_link_error(exc):
        return WriteError(
            f"{shown_path(exc.filename or folder)}: a symbolic link where petlbench writes {what}; petlbench writes "
            "only inside the folder it was given, so remove the link"
        )
    reason = exc.strerror or describe_exception(exc)
    return WriteError(
        f"{shown_path(folder)}: cannot write {what} ({reason}); free space, fix its permissions or choose another "
        "folder"
    )


def check_writable(folder: Path, what: str = "results") -> None:
    """Create `folder` and write and remove a probe file in it, so an unwritable folder fails before any run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = safeio.temp_name(folder / ".write-check")
        fd = safeio.create_new(probe)
        try:
            os.write(fd, b"petlbench")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise _cannot_write(folder, exc, what) from None


def write_result(results_dir: Path, result: RunResult) -> Path:
    """Write one run's row atomically; an existing file for the same run_id is replaced.

    Any OSError (disk full, read-only, a file where the folder should be) is a one-line WriteError naming the
    folder, and the temp file is removed: the folder then holds only whole result files. Nothing is written
    through a symlink (petlbench.system.safeio).
    """
    import pandas as pd

    path = result_path(results_dir, result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        row = result.to_row()
        with safeio.atomic_writer(path) as handle:  # an open file: pyarrow never re-encodes the path
            pd.DataFrame([row]).to_parquet(handle, index=False)
        ledger.record(path, row)  # what makes reading thousands of rows fast (petlbench.system.ledger)
        timeline = why_path(path.parent, result.run_id)
        if result.why is not None:
            save_why(timeline, result.why)
        elif os.path.lexists(timeline):  # a rerun without one: never leave the old run's timeline beside the new row
            timeline.unlink()
    except OSError as exc:
        raise _cannot_write(path.parent, exc) from None
    return path


LOCK_NAME: Final = ".lock"


@contextlib.contextmanager
def results_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` (flock) for a sweep: a second `petlbench run` of the same suite refuses at once.

    The kernel drops the lock when the holder dies (even by kill -9), so a stale lock never blocks a rerun. The
    file is opened without following a symlink and refused when it is a hard link (its content is rewritten).
    """
    import fcntl

    check_writable(folder)
    lock_path = folder / LOCK_NAME
    try:
        fd = safeio.open_lock(lock_path)
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise ResultsLocked(
                f"{shown_path(folder)}: another petlbench run (PID {holder}) is running this suite; wait for it to "
                "finish, or use another --results-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def estimate_dir(results_dir: Path, suite: str) -> Path:
    """Where `petlbench estimate` writes suite `suite`'s predictions: beside, never inside, its measured rows."""
    return results_dir / f"{suite}{ESTIMATE_SUFFIX}"


def result_files(paths: Iterable[Path]) -> list[Path]:
    """All result files under the given files/folders, sorted (deterministic).

    Estimate folders (`<suite>.estimate/`) below a given folder are left out, so reading `results/` never mixes
    predictions into measurements; name an estimate folder itself to read it. Below a folder only regular files
    count (a folder, FIFO or device named `*.parquet` is not a result).
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
                and p.is_file()
            )
        else:
            raise ResultsError(f"{shown_path(path)}: no such results file or folder; run `petlbench run SUITE` first")
    return sorted(files)


# Columns every results row has (what `RunResult.to_row` writes first). A parquet file without them is not a
# petlbench result (a stray file copied into the folder) and is refused, never read as a row.
ROW_COLUMNS: Final = ("run_id", "schema_version", "suite", "status")
_MOVE_OUT = "move it out of the results folder (or delete it to re-run that run)"
# Below this many files a thread pool costs more than it saves.
_PARALLEL_FILES: Final = 32


def _kind_name(kind: pa.DataType) -> str:
    """An arrow type as a reader of a message calls it."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    for check, name in (
        (pa.types.is_string, "text"),
        (pa.types.is_large_string, "text"),
        (pa.types.is_boolean, "true/false"),
        (pa.types.is_integer, "integers"),
        (pa.types.is_floating, "numbers"),
        (pa.types.is_list, "lists"),
        (pa.types.is_large_list, "lists"),
        (pa.types.is_struct, "records"),
        (pa.types.is_map, "maps"),
        (pa.types.is_temporal, "dates or times"),
    ):
        if check(kind):
            return name
    return str(kind)


def _type_problem(name: str, kind: pa.DataType) -> str | None:
    """Why a column of this arrow type cannot hold the catalogue column `name` (None: it can). Nested values
    (lists, records, maps) are never result values: `RunResult.to_row` writes scalars only."""
    import pyarrow as pa

    if pa.types.is_null(kind):
        return None
    if pa.types.is_nested(kind):
        return f"column {name} holds {_kind_name(kind)}; a result cell is a single value"
    entry = catalogue().get(name)
    if entry is None:
        return None
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    fits = {
        "str": pa.types.is_string(kind) or pa.types.is_large_string(kind),
        "int": pa.types.is_integer(kind) or pa.types.is_floating(kind),
        "float": pa.types.is_integer(kind) or pa.types.is_floating(kind),
        "bool": pa.types.is_boolean(kind),
    }[entry.dtype]
    if fits:
        return None
    if name == "schema_version":
        return "schema_version is not a number; not a petlbench results file"
    expected = {"str": "text", "int": "integers", "float": "numbers", "bool": "true/false"}[entry.dtype]
    return f"column {name} holds {_kind_name(kind)}, where petlbench writes {expected} (petlbench/columns.py)"


def _read_table(path: Path, columns: Sequence[str] | None) -> pa.Table:
    """One results file as an arrow table (only `columns` and the row columns, when given), through the one schema
    check every command shares: readable parquet, the row columns present, every catalogue column of its declared
    type, a schema version this petlbench knows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shown = shown_path(path)
    try:
        with open(path, "rb") as handle:  # opened here: a path that is not UTF-8 reaches the OS as its bytes
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            missing_columns = [c for c in ROW_COLUMNS if c not in schema.names]
            if missing_columns:
                raise ResultsError(
                    f"{shown}: not a petlbench results file (no {', '.join(missing_columns)} column); {_MOVE_OUT}"
                )
            for field in schema:
                problem = _type_problem(field.name, field.type)
                if problem:
                    raise ResultsError(f"{shown}: {problem}; {_MOVE_OUT}")
            wanted = None
            if columns is not None:
                wanted = [c for c in dict.fromkeys([*ROW_COLUMNS, *columns]) if c in schema.names]
            table = parquet.read(columns=wanted, use_threads=False, use_pandas_metadata=False)
    except ResultsError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ResultsError(
            f"{shown}: unreadable results file ({describe_exception(exc)}); "
            "delete it to re-run that run, or move it out of the results folder"
        ) from None
    if table.num_rows:
        versions = table.column("schema_version")
        if versions.null_count:
            raise ResultsError(f"{shown}: schema_version is not a number; not a petlbench results file; {_MOVE_OUT}")
        version = pc.max(versions).as_py()
        if version > SCHEMA_VERSION:
            raise ResultsError(
                f"{shown}: written with result schema {version:g}, newer than this petlbench ({SCHEMA_VERSION}); "
                "upgrade petlbench to read it, or move it out of the results folder"
            )
    return table


def _read(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """One results file as a DataFrame (see `_read_table`)."""
    frame: pd.DataFrame = _read_table(path, columns).to_pandas(integer_object_nulls=True)
    return frame


_BATCH: Final = 512  # tables read, then copied into one: thousands of one-row tables hold much more memory


def _read_tables(files: Sequence[Path], columns: Sequence[str] | None) -> list[pa.Table]:
    """Every file's table, in order, with an `_ORDER` column holding its position in `files`; the first bad file
    (in that order) raises. Files are read by a few threads: parsing a parquet footer is most of the cost of a
    one-row file, and pyarrow does it without the GIL."""
    import pyarrow as pa

    def one(position: int) -> pa.Table:
        table = _read_table(files[position], columns)
        return table.append_column(_ORDER, pa.array([position] * table.num_rows, pa.int64()))

    if len(files) < _PARALLEL_FILES:
        return [one(i) for i in range(len(files))]
    from concurrent.futures import ThreadPoolExecutor

    batches: list[pa.Table] = []
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), _BATCH):
            tables = list(pool.map(one, range(start, min(start + _BATCH, len(files)))))
            try:
                batches.append(pa.concat_tables(tables, promote_options="permissive").combine_chunks())
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                batches.extend(tables)  # types that do not unify: load_results mixes them through pandas
    return batches


_ORDER: Final = "__petlbench_file__"  # where each row came from, while files and ledger rows are merged


def _ledger_row(path: Path, row: dict[str, Any], columns: Sequence[str] | None) -> dict[str, Any] | None:
    """A ledger row for `path` when it passes the checks a file's columns pass (None: read the file instead)."""
    if any(name not in row for name in ROW_COLUMNS):
        return None
    wanted = row if columns is None else {k: row[k] for k in dict.fromkeys([*ROW_COLUMNS, *columns]) if k in row}
    for name, value in wanted.items():
        if value is None:
            continue
        entry = catalogue().get(name)
        dtype = entry.dtype if entry is not None else None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        fits = {
            "str": isinstance(value, str),
            "int": number,
            "float": number,
            "bool": isinstance(value, bool),
            None: isinstance(value, str | int | float | bool),
        }[dtype]
        if not fits:
            return None
    version = wanted["schema_version"]
    if not isinstance(version, int | float) or isinstance(version, bool):
        return None
    if version > SCHEMA_VERSION:
        raise ResultsError(
            f"{shown_path(path)}: written with result schema {version:g}, newer than this petlbench "
            f"({SCHEMA_VERSION}); upgrade petlbench to read it, or move it out of the results folder"
        )
    return dict(wanted)


def load_results(paths: Iterable[Path], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Every row under the given results files/folders, as one DataFrame (empty if none). `columns`: read only
    these (and the row columns); the others are not read at all. A row petlbench wrote comes from its folder's
    ledger while its file is unchanged (petlbench.system.ledger), any other from its parquet file."""
    import pandas as pd
    import pyarrow as pa

    files = result_files(paths)
    books: dict[Path, dict[str, tuple[str, dict[str, Any]]]] = {}
    rows: list[dict[str, Any]] = []
    unread: list[int] = []
    for position, file in enumerate(files):
        if file.parent not in books:
            books[file.parent] = ledger.entries(file.parent)
        entry = books[file.parent].get(file.name)
        row = None
        if entry is not None and entry[0] == ledger.fingerprint(file):
            row = _ledger_row(file, entry[1], columns)
        if row is None:
            unread.append(position)
        else:
            rows.append({**row, _ORDER: position})
    tables = _read_tables([files[i] for i in unread], columns)
    tables = [t.set_column(t.schema.get_field_index(_ORDER), _ORDER, _positions(t, unread)) for t in tables]
    tables = [t for t in tables if t.num_rows]
    ledger_frame: pd.DataFrame | None = None
    if rows:
        try:
            names = list(dict.fromkeys(k for r in rows for k in r))
            tables.insert(0, pa.table({name: pa.array([r.get(name) for r in rows]) for name in names}))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # a column no catalogue entry types (a tuner knob) holds text in one row and numbers in another
            ledger_frame = pd.DataFrame.from_records(rows)
    if not tables and ledger_frame is None:
        empty: pd.DataFrame = pd.DataFrame()
        return empty
    frame: pd.DataFrame | None = None
    if ledger_frame is None:
        try:
            frame = pa.concat_tables(tables, promote_options="permissive").to_pandas(integer_object_nulls=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            frame = None  # a column no catalogue entry types holds text in one file and numbers in another
    if frame is None:
        parts = [t.to_pandas(integer_object_nulls=True) for t in tables]
        frame = pd.concat([*([ledger_frame] if ledger_frame is not None else []), *parts], ignore_index=True)
    combined: pd.DataFrame = frame.sort_values(_ORDER, kind="stable").drop(columns=_ORDER).reset_index(drop=True)
    return combined


def _positions(table: pa.Table, unread: list[int]) -> pa.Array:
    """The `_ORDER` column of a table read from `files[unread[i]]`: back from i to the file's position."""
    import pyarrow as pa

    return pa.array([unread[i] for i in table.column(_ORDER).to_pylist()], pa.int64())


def stored_statuses(folder: Path) -> dict[str, str]:
    """run_id → status of every result file in one suite folder (reads the row columns only)."""
    if not folder.exists():
        return {}
    frame = load_results([folder], columns=ROW_COLUMNS)
    if frame.empty:
        return {}
    return {str(r): str(s) for r, s in zip(frame["run_id"], frame["status"], strict=True)}


def stored_durations(folder: Path) -> list[float]:
    """The durations of the runs stored in one suite folder (reads that column only)."""
    if not folder.exists():
        return []
    frame = load_results([folder], columns=["duration_s"])
    if frame.empty or "duration_s" not in frame.columns:
        return []
    return [float(d) for d in frame["duration_s"] if isinstance(d, int | float) and not missing(d)]


def stored_results(folder: Path) -> list[RunResult]:
    """Every row of one suite folder read back as a RunResult (spec, status, metrics; not env or timelines)."""
    if not folder.exists():
        return []
    columns = ["spec_json", "error", "created_at", "duration_s", *Metrics.model_fields]
    frame = load_results([folder], columns=columns)
    if frame.empty or "spec_json" not in frame.columns:
        return []
    stored: list[RunResult] = []
    for row in frame.to_dict("records"):
        if not isinstance(row.get("spec_json"), str):
            continue
        values = {name: row[name] for name in Metrics.model_fields if name in row and not missing(row[name])}
        error, duration = row.get("error"), row.get("duration_s")
        try:
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
        except ValidationError as exc:  # a row petlbench did not write (its columns have the right types)
            where = shown_path(folder / f"{row['run_id']}{RESULT_SUFFIX}")
            problem = exc.errors()[0]
            field = ".".join(str(part) for part in problem["loc"]) or "row"
            raise ResultsError(f"{where}: {field}: {problem['msg']}; not a row petlbench wrote; {_MOVE_OUT}") from None
    return stored


def summarize(results: Iterable[RunResult]) -> Mapping[str, int]:
    """Count of runs per status."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    return counts
