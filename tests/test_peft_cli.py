"""`tuner: peft` as a user meets it: bad peft configs stop `validate` and `run` with one line before any worker
starts (peft checks them in a child process), and a tiny suite of six peft methods runs, reports and budgets
through the real command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import petlbench.executors.local as local_executor
from petlbench.cli.app import app
from petlbench.estimate.engine import estimate_memory
from petlbench.results import load_results, suite_dir
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from tests.conftest import TINY_BACKBONE

pytestmark = pytest.mark.slow  # each check starts a child that imports torch and peft

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# The tiny CPU twin of suites/peft.yaml: six peft methods on timm's test_vit, one measured step each.
TINY_PEFT: dict[str, Any] = {
    "name": "peft-tiny",
    "device": "cpu",
    "backbone": TINY_BACKBONE.model_dump(),
    "data": {"name": "synthetic", "num_classes": 10},
    "batch_size": 4,
    "measure": {"warmup_steps": 2, "steps": 1, "inference": False, "cpu_threads": 1},
    "timeout_s": 300,
    "tuners": [
        {"tuner": "peft", "params": {"peft_type": "LORA", "config": {"lora_alpha": 8}}, "grid": {"r": [4]}},
        {"tuner": "peft", "params": {"peft_type": "LORA", "config": {"r": 4, "use_dora": True}}},
        {"tuner": "peft", "params": {"peft_type": "LOHA", "config": {"r": 4, "target_modules": ["qkv", "fc2"]}}},
        {
            "tuner": "peft",  # a config field beside peft_type moves into config
            "params": {"peft_type": "IA3", "feedforward_modules": ["fc2"], "target_modules": ["qkv", "fc2"]},
        },
        {"tuner": "peft", "params": {"peft_type": "VERA", "config": {"r": 16}}},
        {"tuner": "peft", "params": {"peft_type": "BOFT", "config": {"boft_block_size": 4}}},
    ],
}


def write_suite(tmp_path: Path, tuners: list[dict[str, Any]], **fields: Any) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**TINY_PEFT, "name": "bad", "tuners": tuners, **fields}))
    return path


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def peft_entry(config: dict[str, Any], peft_type: str = "LORA", **entry: Any) -> dict[str, Any]:
    return {"tuner": "peft", "params": {"peft_type": peft_type, "config": config}, **entry}


BAD = {
    "unknown peft_type": (
        peft_entry({}, peft_type="LORRA"),
        "tuners[1].params.peft_type: unknown peft method 'LORRA'; did you mean 'LORA'?",
    ),
    "unknown field": (
        peft_entry({"rr": 8}),
        "tuners[1].params.config.rr: unknown field of peft's LoraConfig; did you mean 'r'?",
    ),
    "ill-typed field": (
        peft_entry({"r": "eight"}),
        "tuners[1].params.config.r: should be a valid integer (LoraConfig), got 'eight'",
    ),
    "ill-typed grid value": (
        peft_entry({}, grid={"r": [4, 2.5]}),
        "tuners[1].grid.r: should be a valid integer (LoraConfig), got 2.5",
    ),
    "missing target module": (
        peft_entry({"target_modules": ["qkv", "q_proj"]}),
        "tuners[1].params.config.target_modules: 'q_proj' matches no module of VisionTransformer",
    ),
    "method that does not apply": (
        peft_entry({}, peft_type="PROMPT_TUNING"),
        "tuners[1].params.peft_type: PROMPT_TUNING is a prompt-learning method",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_peft_config_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    entry, expected = BAD[case]
    suite = write_suite(tmp_path, [{"tuner": "linear"}, entry])
    result = runner.invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2, result.output
    (line,) = errors(result.output)
    assert line.startswith(f"error: {suite}: {expected}"), line


def test_run_stops_before_any_worker_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_worker(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker started")

    monkeypatch.setattr(local_executor, "run_in_subprocess", no_worker)
    suite = write_suite(tmp_path, [{"tuner": "linear"}, peft_entry({"rr": 8})])
    results = tmp_path / "results"
    result = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert result.exit_code == 2, result.output
    assert len(errors(result.output)) == 1 and "tuners[1].params.config.rr" in result.output
    assert not results.exists() or not list(results.rglob("*.parquet"))


def test_estimate_checks_peft_configs_too(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, [peft_entry({"r": "eight"})])
    result = runner.invoke(app, ["estimate", str(suite), "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    assert errors(result.output) == [
        f"error: {suite}: tuners[0].params.config.r: should be a valid integer (LoraConfig), got 'eight'"
    ]


def test_without_peft_the_suite_stops_with_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft not importable in the checking child: a `peft` package ahead on its path that fails to import."""
    fake = tmp_path / "no-peft" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'peft'\")\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p))
    suite = write_suite(tmp_path, [peft_entry({})])
    result = runner.invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2, result.output
    (line,) = errors(result.output)
    assert line.startswith(f"error: {suite}: tuners[0].tuner: peft: the Hugging Face peft library cannot be imported")
    assert line.endswith('pip install "petlbench[peft]"')


def test_peft_configs_are_checked_by_the_one_probe_child(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The pre-flight starts one child for the whole suite, peft entries included (no child of its own for peft)."""
    import petlbench.run.probe as probe

    calls: list[str] = []
    original = probe.call_child

    def counted(target: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(target)
        return original(target, *args, **kwargs)

    monkeypatch.setattr(probe, "call_child", counted)
    suite = write_suite(tmp_path, [{"tuner": "linear"}, peft_entry({"rr": 8})])
    result = runner.invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2 and "tuners[1].params.config.rr" in result.output, result.output
    assert calls == ["probe"]


def test_shipped_peft_suite_validates() -> None:
    result = runner.invoke(app, ["validate", str(ROOT / "suites" / "peft.yaml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for method in ("peft-lora", "peft-lora-dora", "peft-loha", "peft-lokr", "peft-ia3", "peft-vera", "peft-boft"):
        assert f" {method} " in result.output


def test_tiny_peft_suite_runs_reports_and_budgets(tmp_path: Path) -> None:
    suite = tmp_path / "peft-tiny.yaml"
    suite.write_text(yaml.safe_dump(TINY_PEFT))
    results = tmp_path / "results"
    result = runner.invoke(app, ["run", str(suite), "--results-dir", str(results), "--jobs", "2", "--strict"])
    assert result.exit_code == 0, result.output
    rows = load_results([suite_dir(results, "peft-tiny")]).set_index("method")
    assert sorted(rows.index) == [
        "peft-boft",
        "peft-ia3",
        "peft-loha",
        "peft-lora",
        "peft-lora-dora",
        "peft-vera",
    ]
    assert set(rows["status"]) == {"ok"}
    assert rows.loc["peft-lora", "knob_name"] == "r" and rows.loc["peft-lora", "knob"] == 4
    assert yaml.safe_load(rows.loc["peft-lora", "tuner.config"]) == {"lora_alpha": 8, "r": 4, "target_modules": ["qkv"]}
    for column in ("mem_weights_bytes", "mem_optimizer_bytes", "mem_activations_bytes"):  # the breakdown at the peak
        assert (rows[column] > 0).all(), column
    # LoRA on the fused qkv: one A (r×d) and one B (3d×r) per block, plus the 10-class head
    d, depth = 64, 3
    assert rows.loc["peft-lora", "params_trainable"] == depth * 4 * (d + 3 * d) + d * 10 + 10

    baseline = tmp_path / "budgets.yaml"
    proposed = runner.invoke(app, ["check", str(results), "--write-baseline", str(baseline)])
    assert proposed.exit_code == 0, proposed.output
    checked = runner.invoke(app, ["check", str(results), "--budgets", str(baseline)])
    assert checked.exit_code == 0 and " within budget, 0 over" in checked.output, checked.output
    report = runner.invoke(app, ["report", str(results), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "peft-lora-dora" in (tmp_path / "report" / "report.md").read_text()


def test_auto_batch_searches_a_peft_method(tmp_path: Path) -> None:
    """LoHa (a Python branch on a random draw, which the estimate answers with a constant) under batch_size: auto:
    the estimate seeds the search and real runs confirm it."""
    entry = peft_entry({"r": 4, "target_modules": ["qkv", "fc2"]}, peft_type="LOHA")
    suite = write_suite(tmp_path, [entry], name="auto", batch_size="auto", auto_batch={"min": 1, "max": 256})
    run = expand(load_suite(suite), "cpu")[0]
    limit = estimate_memory(run.model_copy(update={"batch_size": 12})).peak_allocated_bytes or 0
    results = tmp_path / "results"
    outcome = runner.invoke(app, ["run", str(suite), "--results-dir", str(results), "--memory-limit", f"{limit}B"])
    assert outcome.exit_code == 0, outcome.output
    assert "max feasible batch 12 (predicted 12)" in outcome.output
    rows = load_results([suite_dir(results, "auto")]).set_index("batch_size")
    assert rows.loc[12, "peak_allocated_bytes"] <= limit < rows.loc[13, "peak_allocated_bytes"]
