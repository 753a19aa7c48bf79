"""The memory-planning commands as a user meets them: `petlbench estimate`, `run --skip-predicted-oom`, and
`batch_size: auto`; estimate rows never mix with measured ones; the parent stays torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.estimate.engine import estimate_memory
from petlbench.results import estimate_dir, load_results, suite_dir
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = """\
name: {name}
device: cpu
data: {{name: synthetic, num_classes: 10}}
backbone: {{model: test_vit, img_size: 32, kwargs: {{patch_size: 8, depth: 2}}}}
measure: {{warmup_steps: 2, steps: 1, inference: false}}
timeout_s: 120
"""

pytestmark = pytest.mark.slow


def write_suite(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name) + body)
    return path


def peaks(path: Path) -> dict[int, int]:
    """batch size → estimated peak of the suite's first tuner (in-process; what the CLI must report)."""
    return {r.batch_size: estimate_memory(r).peak_allocated_bytes or 0 for r in expand(load_suite(path), "cpu")}


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_estimate_prints_fits_and_oom_and_stores_rows_apart_from_measured(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "est", "batch_size: [4, 64]\ntuners: [{tuner: lora}]\n")
    predicted = peaks(suite)
    small, big = predicted[4], predicted[64]
    limit = (small + big) // 2
    results = tmp_path / "results"
    sized = f"{limit}B"
    args = ["estimate", str(suite), "--device", "cpu", "--device-memory", sized, "--results-dir", str(results)]
    outcome = runner.invoke(app, [*args, "--jobs", "1"])
    assert outcome.exit_code == 0, outcome.output
    assert "FITS" in outcome.output and "OOM" in outcome.output
    assert "2 runs estimated" in outcome.output and "1 fit" in outcome.output and "1 over" in outcome.output
    rows = load_results([estimate_dir(results, "est")]).set_index("batch_size")
    assert set(rows["memory_source"]) == {"estimate"} and set(rows["suite"]) == {"est.estimate"}
    assert rows.loc[4, "peak_allocated_bytes"] == small and rows.loc[64, "peak_allocated_bytes"] == big
    assert rows["memory_limit_bytes"].isna().all()  # a prediction does not depend on the limit it is judged against
    assert not suite_dir(results, "est").exists()  # measured rows are elsewhere, untouched
    # judged against another size, the rows are the same predictions: both answers stay readable
    other = runner.invoke(app, [*args[:-4], "--device-memory", "80GiB", "--results-dir", str(results), "--jobs", "1"])
    assert other.exit_code == 0 and "2 fit 80 GiB" in other.output, other.output
    again_rows = load_results([estimate_dir(results, "est")]).set_index("batch_size")
    assert (again_rows["peak_allocated_bytes"] == rows["peak_allocated_bytes"]).all()
    # --strict: a predicted OOM is a finding
    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == 1, strict.output

    # measure one of the runs: reading results/ gives the measured row only; the estimate has the same run_id
    run = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert run.exit_code == 0, run.output
    measured = load_results([results])
    assert set(measured["memory_source"]) == {"cpu_tracker"} and len(measured) == 2
    both = measured.merge(load_results([estimate_dir(results, "est")]), on="run_id", suffixes=("", "_est"))
    assert len(both) == 2 and (both["peak_allocated_bytes"] == both["peak_allocated_bytes_est"]).all()
    # estimating again rewrites estimate rows only
    again = runner.invoke(app, [*args, "--jobs", "1"])
    assert again.exit_code == 0, again.output
    assert set(load_results([results])["memory_source"]) == {"cpu_tracker"}


def test_bad_memory_sizes_are_one_line_usage_errors(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "bad", "batch_size: 4\ntuners: [{tuner: linear}]\n")
    for text, why in (("lots", "not a memory size: 'lots'"), ("80", "memory size '80' has no unit")):
        outcome = runner.invoke(app, ["estimate", str(suite), "--device-memory", text, "--results-dir", str(tmp_path)])
        assert outcome.exit_code == 2
        assert errors(outcome.output) == [
            f"error: --device-memory: {why}; write it with a unit: 80GiB, 24GB, 512MiB or 512M (K/M/G/T alone are "
            "binary), 1000B"
        ]
        assert not (tmp_path / "bad.estimate").exists()  # refused before estimating anything
    no_limit = runner.invoke(app, ["run", str(suite), "--skip-predicted-oom", "--results-dir", str(tmp_path)])
    assert no_limit.exit_code == 2 and len(errors(no_limit.output)) == 1
    assert "--memory-limit: required for CPU runs" in no_limit.output
    stray = runner.invoke(app, ["run", str(suite), "--memory-limit", "1GiB", "--results-dir", str(tmp_path)])
    assert stray.exit_code == 2 and "--memory-limit: only used with --skip-predicted-oom" in stray.output


def test_skip_predicted_oom_records_skipped_rows_and_runs_the_rest(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "skip", "batch_size: [4, 256]\ntuners: [{tuner: linear}]\n")
    small, big = peaks(suite)[4], peaks(suite)[256]
    limit = (small + big) // 2
    results = tmp_path / "results"
    args = ["run", str(suite), "--results-dir", str(results), "--skip-predicted-oom", "--memory-limit", f"{limit}B"]
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert "1 of 2 runs predicted over" in outcome.output and "skipped: 1" in outcome.output
    rows = load_results([results]).set_index("batch_size")
    assert rows.loc[4, "status"] == "ok" and rows.loc[4, "memory_source"] == "cpu_tracker"
    skipped = rows.loc[256]
    assert skipped["status"] == "skipped" and skipped["memory_source"] == "estimate"
    assert skipped["peak_allocated_bytes"] == big and skipped["memory_limit_bytes"] == limit
    assert "predicted peak" in skipped["error"] and "> memory limit" in skipped["error"]
    # skipped runs are retried: with room for both, the skipped one runs now
    wider = runner.invoke(app, [*args[:-1], f"{2 * big}B"])
    assert wider.exit_code == 0, wider.output
    assert "1 done, 1 to run, 1 retried" in wider.output
    rows = load_results([results]).set_index("batch_size")
    assert list(rows["status"]) == ["ok", "ok"] and rows.loc[256, "peak_allocated_bytes"] == big


def test_auto_batch_finds_the_largest_fitting_batch_with_real_runs_and_resumes(tmp_path: Path) -> None:
    body = "batch_size: auto\nauto_batch: {min: 1, max: 512}\ntuners: [{tuner: lora}]\n"
    suite = write_suite(tmp_path, "auto", body)
    run = expand(load_suite(suite), "cpu")[0]
    limit = estimate_memory(run.model_copy(update={"batch_size": 20})).peak_allocated_bytes or 0
    results = tmp_path / "results"
    args = ["run", str(suite), "--results-dir", str(results), "--memory-limit", f"{limit}B"]
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert "max feasible batch 20 (predicted 20)" in outcome.output
    rows = load_results([suite_dir(results, "auto")]).set_index("batch_size")
    assert sorted(rows.index) == [20, 21]  # seeded by the estimate: the answer and the next size
    assert rows.loc[20, "peak_allocated_bytes"] <= limit < rows.loc[21, "peak_allocated_bytes"]
    assert set(rows["memory_limit_bytes"]) == {limit}
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("(stored result)") == 2, again.output
    # the estimate of an auto suite: the largest batch predicted to fit
    estimated = runner.invoke(
        app, ["estimate", str(suite), "--device-memory", f"{limit}B", "--results-dir", str(results), "--jobs", "1"]
    )
    assert estimated.exit_code == 0, estimated.output
    assert "largest batch predicted to fit" in estimated.output
    assert load_results([estimate_dir(results, "auto")])["batch_size"].tolist() == [20]
    cpu_without_limit = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)])
    assert cpu_without_limit.exit_code == 2 and "--memory-limit: required for CPU runs" in cpu_without_limit.output


def test_estimate_leaves_torch_out_of_the_parent(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "free", "batch_size: 4\ntuners: [{tuner: linear}]\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from petlbench.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['estimate', {str(suite)!r}, '--results-dir', {str(tmp_path / 'r')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'FITS' not in r.output and '1 run estimated' in r.output, r.output\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
