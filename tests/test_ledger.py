"""Reading is proportional: a folder's rows come from its ledger (petlbench.system.ledger) while their files are
unchanged, so thousands of result files cost one read; a file changed after it was written is read, and checked,
itself."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

import petlbench.results as results
from petlbench.columns import Metrics
from petlbench.errors import ResultsError
from petlbench.results import RunResult, load_results, now_iso, stored_statuses, write_result
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.system.ledger import LEDGER_NAME
from tests.report_rows import row, write

SUITE = {
    "name": "ledger",
    "device": "cpu",
    "data": {"name": "synthetic", "num_classes": 10},
    "backbone": {"model": "test_vit", "img_size": 32, "kwargs": {"patch_size": 8, "depth": 1}},
    "batch_size": [1, 2, 3, 4, 5, 6],
    "tuners": [{"tuner": "linear"}, {"tuner": "lora", "grid": {"rank": [4, 8]}}],
}


def written(tmp_path: Path) -> Path:
    """18 rows through `write_result`, with metrics and env, some without (None) values."""
    for i, spec in enumerate(expand(parse_suite(SUITE), "cpu")):
        metrics = Metrics(params_trainable=100 + i, peak_allocated_bytes=None if i % 5 == 0 else 1000 * i)
        env = {"torch": "2.14.1", "cpu_count": 2, "git_dirty": bool(i % 2)}
        status = "ok" if i % 4 else "oom"
        write_result(tmp_path, RunResult(spec=spec, status=status, metrics=metrics, env=env, created_at=now_iso()))
    return tmp_path / "ledger"


def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The parquet files the next reads open."""
    opened: list[Path] = []
    real = results._read_table

    def counting(path: Path, columns: object) -> object:
        opened.append(path)
        return real(path, columns)  # type: ignore[arg-type]

    monkeypatch.setattr(results, "_read_table", counting)
    return opened


def test_rows_from_the_ledger_are_the_rows_of_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = written(tmp_path)
    opened = reads(monkeypatch)
    fast = load_results([folder])
    assert opened == []  # every row came from the ledger
    fast_statuses = stored_statuses(folder)
    os.unlink(folder / LEDGER_NAME)
    slow = load_results([folder])
    assert len(opened) == 18
    pd.testing.assert_frame_equal(fast[sorted(fast.columns)], slow[sorted(slow.columns)])
    assert fast_statuses == stored_statuses(folder)
    assert load_results([folder], columns=["duration_s"]).shape[0] == 18


def test_a_file_changed_after_it_was_written_is_read_and_checked(tmp_path: Path) -> None:
    folder = written(tmp_path)
    victim = sorted(folder.glob("*.parquet"))[3]
    run_id = victim.stem
    replaced = row("lora", 2, knob=8, device="cpu", suite="ledger", run_id=run_id, created_at=1_700_000_000)
    write([replaced], folder)  # same name, another file: its column types are checked, never the ledger's row
    with pytest.raises(ResultsError, match=f"{victim.name}: column created_at holds integers"):
        load_results([folder])
    write([{**replaced, "created_at": "2030-01-01T00:00:00+00:00", "params_trainable": 424242}], folder)
    frame = load_results([folder])
    assert frame.loc[frame["run_id"] == run_id, "params_trainable"].tolist() == [424242]


def test_a_damaged_or_hostile_ledger_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = written(tmp_path)
    before = load_results([folder])
    with open(folder / LEDGER_NAME, "ab") as ledger:
        ledger.write(b'{"file": "x.parquet", "fingerprint": "1:2:3", "row": {"run_id": \n')  # cut short
        ledger.write(b"\xff\xfe not json\n")
    opened = reads(monkeypatch)
    pd.testing.assert_frame_equal(load_results([folder]), before)
    assert opened == []
    lines = (folder / LEDGER_NAME).read_text(errors="replace").splitlines()
    hostile = [line.replace('"status":"ok"', '"status":1') for line in lines[:18]]
    (folder / LEDGER_NAME).write_text("\n".join(hostile) + "\n")  # types the catalogue refuses: files are read
    pd.testing.assert_frame_equal(load_results([folder]), before)
    assert len(opened) == (before["status"] == "ok").sum()  # the oom rows' lines were untouched: still trusted
