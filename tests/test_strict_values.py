"""Values that pass a range check but cannot run (inf, nan, a boolean for a number) are refused when a suite is
read, and the run_ids of the shipped suites never move silently (tests/data/run_ids.json pins them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from petlbench.errors import ConfigError
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite

ROOT = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).parent / "data" / "run_ids.json"
BASE: dict[str, Any] = {
    "name": "x",
    "device": "cpu",
    "data": {"name": "synthetic", "num_classes": 10},
    "tuners": [{"tuner": "lora"}],
}
INF, NAN = float("inf"), float("nan")


def _error(extra: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        expand(parse_suite({**BASE, **extra}, source="s.yaml"), "cpu")
    return str(info.value)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"timeout_s": INF}, "timeout_s"),
        ({"timeout_s": NAN}, "timeout_s"),
        ({"optimizer": {"lr": INF}}, "optimizer.lr"),
        ({"optimizer": {"weight_decay": NAN}}, "optimizer.weight_decay"),
        ({"optimizer": {"betas": [0.9, INF]}}, "optimizer.betas[1]"),
        ({"measure": {"nvml_interval_ms": INF}}, "measure.nvml_interval_ms"),
        ({"backbone": {"kwargs": {"mlp_ratio": INF}}}, "backbone.kwargs.mlp_ratio"),
        ({"tuners": [{"tuner": "lora", "params": {"alpha": INF}}]}, "tuners[0].params.alpha"),
        ({"tuners": [{"tuner": "lora", "grid": {"dropout": [0.1, NAN]}}]}, "tuners[0].grid.dropout[1]"),
        ({"tuners": [{"tuner": "lora", "optimizer": {"lr": INF}}]}, "tuners[0].optimizer.lr"),
    ],
)
def test_non_finite_numbers_are_refused(extra: dict[str, Any], field: str) -> None:
    message = _error(extra)
    assert message.startswith(f"s.yaml: {field}: ") and "finite" in message and "\n" not in message


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"batch_size": True}, "batch_size"),
        ({"seed": True}, "seed"),
        ({"seed": [0, False]}, "seed[1]"),
        ({"measure": {"steps": True}}, "measure.steps"),
        ({"backbone": {"img_size": True}}, "backbone.img_size"),
        ({"optimizer": {"lr": True}}, "optimizer.lr"),
        ({"timeout_s": True}, "timeout_s"),
        ({"tuners": [{"tuner": "lora", "params": {"rank": True}}]}, "tuners[0].params.rank"),
        ({"tuners": [{"tuner": "lora", "grid": {"rank": [4, True]}}]}, "tuners[0].grid.rank"),
    ],
)
def test_booleans_are_not_numbers(extra: dict[str, Any], field: str) -> None:
    message = _error(extra)
    assert message.startswith(f"s.yaml: {field}: ") and "boolean" in message


def test_booleans_and_numbers_where_they_belong_still_validate() -> None:
    suite = parse_suite(
        {**BASE, "grad_checkpointing": [False, True], "optimizer": {"lr": 1, "foreach": True}, "timeout_s": 60}
    )
    runs = expand(suite, "cpu")
    assert [r.grad_checkpointing for r in runs] == [False, True]
    assert runs[0].optimizer.lr == 1.0 and runs[0].timeout_s == 60.0


def _shipped_suites() -> list[Path]:
    return [*sorted((ROOT / "suites").rglob("*.yaml")), ROOT / "petlbench" / "suites" / "quickstart.yaml"]


def _current_run_ids() -> dict[str, list[str]]:
    current: dict[str, list[str]] = {}
    for path in _shipped_suites():
        if path.name.startswith("budgets"):
            continue
        suite = load_suite(path)
        for device in ("cpu", "cuda"):
            current[f"{path.relative_to(ROOT)}:{device}"] = [r.run_id for r in expand(suite, device)]
    return current


def test_shipped_run_ids_are_pinned() -> None:
    """A change that moves a run_id re-runs every stored result: it must be deliberate. Regenerate the file with
    `python -c "from tests.test_strict_values import repin; repin()"`."""
    pinned = json.loads(PINNED.read_text())
    assert _current_run_ids() == pinned


def repin() -> None:
    """Write the current run_ids of the shipped suites to tests/data/run_ids.json (after a deliberate change)."""
    PINNED.write_text(json.dumps(_current_run_ids(), indent=1) + "\n")
