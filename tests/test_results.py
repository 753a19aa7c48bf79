"""Result rows: the flat schema, atomic one-file-per-run storage, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from petlbench.columns import Metrics
from petlbench.errors import ResultsError
from petlbench.results import RunResult, load_results, stored_statuses, write_result
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import SCHEMA_VERSION

SUITE = {
    "name": "unit",
    "data": {"name": "synthetic", "num_classes": 10},
    "backbone": {"model": "test_vit", "img_size": 32},
    "batch_size": [8, 16],
    "tuners": [{"tuner": "lora", "grid": {"rank": [4]}}],
}


def make_result(batch_index: int = 0, status: str = "ok") -> RunResult:
    spec = expand(parse_suite(SUITE), "cpu")[batch_index]
    metrics = Metrics(peak_allocated_bytes=1234, params_trainable=56, memory_source="cpu_tracker")
    return RunResult(spec=spec, status=status, metrics=metrics, env={"torch": "x"}, created_at="2026-01-01T00:00:00")


def test_row_is_flat_and_complete() -> None:
    row = make_result().to_row()
    assert row["schema_version"] == SCHEMA_VERSION
    assert row["tuner"] == "lora" and row["knob_name"] == "rank" and row["knob"] == 4.0
    assert row["tuner.rank"] == 4 and row["tuner.targets"] == '["q", "v"]'
    assert row["backbone.model"] == "test_vit" and row["batch_size"] == 8 and row["precision"] == "fp32"
    assert row["peak_allocated_bytes"] == 1234 and row["acc_top1"] is None
    assert row["env.torch"] == "x"
    assert all(not isinstance(v, list | dict | tuple) for v in row.values())


def test_write_then_load_roundtrip(tmp_path: Path) -> None:
    first, second = make_result(0), make_result(1, status="oom")
    path = write_result(tmp_path, first)
    write_result(tmp_path, second)
    assert path == tmp_path / "unit" / f"{first.run_id}.parquet"
    assert not list(tmp_path.rglob("*.tmp")), "temp files must be renamed away"
    frame = load_results([tmp_path])
    assert len(frame) == 2
    assert set(frame["status"]) == {"ok", "oom"}
    assert stored_statuses(tmp_path / "unit") == {first.run_id: "ok", second.run_id: "oom"}
    # rewriting the same run replaces its file: still one row per run
    write_result(tmp_path, make_result(0, status="error"))
    assert len(load_results([tmp_path])) == 2


def test_corrupt_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    write_result(tmp_path, make_result(0))
    bad = tmp_path / "unit" / "deadbeef0000.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ResultsError) as info:
        load_results([tmp_path])
    message = str(info.value)
    assert str(bad) in message and "delete it" in message
    assert len(message.splitlines()) == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = write_result(tmp_path, make_result(0))
    frame = pd.read_parquet(path)
    frame["schema_version"] = SCHEMA_VERSION + 1
    frame.to_parquet(path)
    with pytest.raises(ResultsError, match="newer than this petlbench"):
        load_results([tmp_path])


def test_missing_results_folder(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="run `petlbench run SUITE` first"):
        load_results([tmp_path / "nope"])
    assert stored_statuses(tmp_path / "nope") == {}
