"""The "why" view: the per-run timeline and peak attribution, their storage, the report section, `explain`."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.estimate.engine import Estimator
from petlbench.measure.memory import tracked_train_step
from petlbench.measure.step import TrainStep, make_optimizer
from petlbench.measure.tracker import ALLOC, FREE, PHASE, RESET, RETAG
from petlbench.report import build_report
from petlbench.results import RunResult, write_result
from petlbench.run.model import build_model
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.spec.models import RunSpec
from petlbench.tuners import TUNERS
from petlbench.why import (
    CATEGORIES,
    WhyData,
    find_timelines,
    group_entries,
    heat_strip,
    load_why,
    pattern,
    save_why,
    sublayer,
    summarize_step,
    why_path,
)
from tests.conftest import TINY_BACKBONE

BATCH = 4
TINY: dict[str, Any] = {
    "name": "why",
    "device": "cpu",
    "data": {"name": "synthetic", "num_classes": 10},
    "backbone": TINY_BACKBONE.model_dump(),
    "batch_size": BATCH,
    "measure": {"warmup_steps": 2, "steps": 1, "inference": False},
}
# knobs that make a tuner show its characteristic layers (FacT's tensor-train variant wraps the MLP linears too)
PARAMS: dict[str, dict[str, Any]] = {"fact": {"variant": "tt"}}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny steps on a shared 2-core machine: one intra-op thread is several times faster (no spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec(tuner: str, **overrides: Any) -> RunSpec:
    entry = {"tuner": tuner, "params": PARAMS.get(tuner, {})}
    return expand(parse_suite({**TINY, "tuners": [entry], **overrides}), "cpu")[0]


@cache
def run(tuner: str) -> RunResult:
    result = execute(spec(tuner))
    assert result.status == "ok", result.error
    return result


def activations_by_pattern(why: WhyData) -> dict[str, int]:
    return {g.name: g.bytes for g in group_entries(why.entries, pattern, ["activations"])}


# -- the summary of one tracked step ----------------------------------------------------------------------------


@pytest.mark.parametrize("tuner", sorted(TUNERS))
def test_attribution_sums_to_the_peak_and_the_timeline_reaches_it(tuner: str) -> None:
    result = run(tuner)
    why, metrics = result.why, result.metrics
    assert why is not None
    assert sum(e.bytes for e in why.entries) == metrics.mem_tracked_peak_bytes == metrics.peak_allocated_bytes
    assert max(why.totals()) == metrics.peak_allocated_bytes == why.peak_bytes
    columns = ("mem_weights_bytes", "mem_grads_bytes", "mem_optimizer_bytes", "mem_activations_bytes")
    for category, column in zip(CATEGORIES, columns, strict=True):
        assert sum(e.bytes for e in why.entries if e.category == category) == getattr(metrics, column)
    assert [p for p, _ in why.phases] == ["forward", "backward", "optimizer"]
    starts = [i for _, i in why.phases]
    assert starts == sorted(starts) and starts[0] == 0
    assert why.peak_event in why.x and len(why.x) <= 2000 + 4
    # activations produced inside the model are attributed to a module: the unattributed rest is the batch + loss
    unattributed = sum(e.bytes for e in why.entries if e.category == "activations" and not e.module)
    assert unattributed < metrics.mem_activations_bytes  # type: ignore[operator]


@pytest.mark.parametrize("tuner", sorted(TUNERS))
def test_module_tracking_does_not_change_the_peak(tuner: str) -> None:
    """The hooks that attribute storages must allocate nothing: the same step tracked without them peaks alike."""
    s = spec(tuner)
    peaks = []
    for attribute in (False, True):
        tuned = build_model(s, 10)
        step = TrainStep(tuned.module, make_optimizer(tuned.trainable_parameters(), s.optimizer), "fp32", "cpu")
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(BATCH, 3, 32, 32, generator=generator), torch.randint(10, (BATCH,), generator=generator)
        for _ in range(2):
            step(x, y)
        tracked = tracked_train_step(step, x, y, attribute=attribute)
        peaks.append((tracked.peak_bytes, tracked.by_category))
    assert peaks[0] == peaks[1]


def test_summary_of_a_hand_made_log() -> None:
    """Two registered tensors, then a step: 100 B forward, a 50 B temp freed, a grad retagged, optimizer 30 B."""
    events = [
        (ALLOC, 0, "weights", 1000),
        (ALLOC, 1, "activations", 8),  # the batch
        (RESET, -1, "activations", 0),
        (PHASE, 0, "activations", 0),
        (ALLOC, 2, "activations", 100),
        (ALLOC, 3, "activations", 50),
        (FREE, 3, "activations", 50),
        (PHASE, 1, "activations", 0),
        (ALLOC, 4, "activations", 70),
        (RETAG, 4, "gradients", 70),
        (FREE, 2, "activations", 100),
        (PHASE, 2, "activations", 0),
        (ALLOC, 5, "optimizer", 30),
    ]
    owners = [0, 0, 1, 2, 1, 0]
    why = summarize_step(events, owners, ["", "blocks.0.mlp.fc1", "blocks.0.mlp.act"], points=3)
    # live totals after each step event: 1008, 1108, 1158, 1108, 1108, 1178, 1178, 1078, 1078, 1108
    assert why.events == 10
    assert why.peak_bytes == 1178 and why.peak_event == 5 and why.peak_phase == "backward"
    assert why.phases == [("forward", 0), ("backward", 4), ("optimizer", 8)]
    assert max(why.totals()) == 1178
    assert {(e.module, e.category): e.bytes for e in why.entries} == {
        ("", "weights"): 1000,
        ("", "activations"): 8,
        ("blocks.0.mlp.fc1", "activations"): 170,  # the forward output (100) and the backward temp (70)
    }
    assert sum(e.bytes for e in why.entries) == why.peak_bytes
    rounded = summarize_step(events, owners, ["", "a", "b"], round_to=512)
    # 1000 B is two 512-B blocks, every other tensor one: the 50-B temporary now weighs as much as the 70-B
    # gradient, so the peak moves to forward (2 + 1 + 1 + 1 blocks)
    assert rounded.peak_bytes == 5 * 512 and rounded.peak_event == 2 and rounded.peak_phase == "forward"


def test_sublayers_and_patterns() -> None:
    assert sublayer("blocks.7.mlp.fc1") == (7, "fc1")
    assert sublayer("blocks.7.attn.qkv.lora_a") == (7, "qkv")
    assert sublayer("blocks.3.base.attn") == (3, "attn")  # a tuner's block wrapper
    assert sublayer("backbone.blocks.0.norm2") == (0, "norm")
    assert sublayer("blocks.2.ls1") == (2, "other")
    assert sublayer("head") is None
    assert pattern("backbone.blocks.11.attn.qkv") == "backbone.blocks.*.attn.qkv"
    assert pattern("qsm.3.attn") == "qsm.3.attn"


def test_stored_summary_round_trips_and_is_small(tmp_path: Path) -> None:
    why = run("full").why
    assert why is not None
    path = save_why(why_path(tmp_path, "abc"), why)
    assert load_why(path) == why
    assert path.stat().st_size < 1_000_000
    assert find_timelines([tmp_path]) == {"abc": path}


# -- what the data shows ------------------------------------------------------------------------------------------


def test_fact_keeps_the_mlp_inputs_and_lora_does_not() -> None:
    """FacT-TT adapts fc1 and fc2, so autograd keeps their inputs (outputs of norm2 and mlp.act); LoRA adapts only
    qkv, so its frozen MLP linears save nothing and mlp.act's output is freed right after fc2 used it."""
    fact, lora = run("fact").why, run("lora").why
    assert fact is not None and lora is not None
    fact_top = [g.name for g in group_entries(fact.entries, pattern, ["activations"])[:5]]
    assert "blocks.*.mlp.act" in fact_top
    token_tensor = BATCH * ((32 // 8) ** 2 + 1) * 64 * 4  # one [B, N, D] fp32 tensor
    lora_act = activations_by_pattern(lora)
    assert lora_act.get("blocks.*.mlp.act", 0) == 0
    assert lora_act.get("blocks.*.norm2", 0) < token_tensor  # LayerNorm's mean/rstd only, not its output
    assert activations_by_pattern(fact)["blocks.*.norm2"] >= 2 * token_tensor  # fc1's input, ≥ 2 blocks at peak
    strip = heat_strip(fact.entries)
    assert strip[:, 4].sum() > 0 and heat_strip(lora.entries)[:, 4].sum() == 0  # column "act"


def test_sqt_keeps_one_key_and_one_value_copy_per_block() -> None:
    """SQT's K/V capture (a forward hook on attn.qkv) lands on `backbone.blocks.i.attn`: exactly two
    [B, heads, N, head_dim] fp32 tensors per block but the last (whose K/V are computed at top level)."""
    why = run("sqt").why
    assert why is not None
    depth, tokens, dim = TINY_BACKBONE.kwargs["depth"], (32 // 8) ** 2 + 1, 64
    for i in range(int(depth) - 1):  # type: ignore[call-overload]
        hits = [e for e in why.entries if e.module == f"backbone.blocks.{i}.attn" and e.category == "activations"]
        assert [(e.tensors, e.bytes) for e in hits] == [(2, 2 * BATCH * tokens * dim * 4)]
    strip = heat_strip(why.entries)
    assert (strip[:-1].argmax(axis=1) == 1).all()  # in every block but the last, "attn" holds the most


def test_estimate_gives_the_same_summary_as_a_real_run() -> None:
    """Fake tensors in the estimator, real ones in the worker: the same timeline and attribution, byte for byte."""
    for tuner in ("lora", "sqt"):
        metrics, why = Estimator().estimate_why(spec(tuner))
        real = run(tuner).why
        assert real is not None
        assert why.peak_bytes == metrics.peak_allocated_bytes == real.peak_bytes
        assert why.entries == real.entries and why.peak_event == real.peak_event
        # forward and backward event for event; the optimizer step differs (a real AdamW step allocates a few
        # scalar temporaries that the fake one does not), after the peak
        assert why.phases[:2] == real.phases[:2]


# -- report and explain --------------------------------------------------------------------------------------


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    for tuner in ("lora", "fact", "sqt"):
        write_result(tmp_path, run(tuner))
    return tmp_path


def test_report_shows_the_timeline_and_the_activations(results_dir: Path, tmp_path: Path) -> None:
    summary = build_report([results_dir], ["all"], tmp_path / "reports")
    names = {p.name for p in summary.figures}
    assert any(n.startswith("timeline-") for n in names) and any(n.startswith("activations-") for n in names)
    text = summary.markdown.read_text()
    assert "Why: memory over one training step" in text and "Where the activations are" in text
    assert r"blocks.\*.mlp.act" in text  # FacT's row in the top-modules table (Markdown-escaped: a literal *)
    assert "blocks.*.mlp.act" in summary.html.read_text()


def test_explain_one_run_and_a_difference(results_dir: Path) -> None:
    fact = run("fact")
    out = CliRunner().invoke(app, ["explain", str(results_dir), "--run", fact.run_id[:10]])
    assert out.exit_code == 0, out.output
    assert "peak" in out.output and "blocks.*.mlp.act" in out.output
    assert f"{fact.metrics.peak_allocated_bytes:,} B" in out.output
    out = CliRunner().invoke(
        app, ["explain", str(results_dir), "--method", "fact-tt", "--batch-size", str(BATCH), "--vs", "lora"]
    )
    assert out.exit_code == 0, out.output
    fact_why, lora_why = fact.why, run("lora").why
    assert fact_why is not None and lora_why is not None
    delta = activations_by_pattern(fact_why)["blocks.*.mlp.act"]
    assert "blocks.*.mlp.act" in out.output and "keeps" in out.output
    bad = CliRunner().invoke(app, ["explain", str(results_dir), "--method", "nope"])
    assert bad.exit_code == 2 and "--method nope" in bad.output
    assert delta > 0


def test_stale_timeline_is_removed_when_a_rerun_has_none(results_dir: Path) -> None:
    lora = run("lora")
    path = why_path(results_dir / lora.spec.suite, lora.run_id)
    assert path.exists()
    write_result(results_dir, lora.model_copy(update={"why": None}))
    assert not path.exists()


def test_snapshot_field_leaves_run_ids_alone() -> None:
    base = spec("lora")
    assert base.measure.snapshot is None
    on = spec("lora", measure={**TINY["measure"], "snapshot": True})
    assert on.run_id != base.run_id and spec("lora").run_id == base.run_id
    assert "snapshot" not in base.model_dump(mode="json", exclude={"measure": {"snapshot"}})["measure"]


@pytest.mark.gpu
def test_cuda_snapshot_is_saved_beside_the_row(tmp_path: Path) -> None:
    from petlbench.executors.local import run_in_subprocess

    cuda = spec("lora", device="cuda", measure={**TINY["measure"], "snapshot": True}).model_copy(
        update={"device": "cuda"}
    )
    result = run_in_subprocess(cuda, tmp_path)
    assert result.status == "ok", result.error
    assert result.snapshot_file is not None and Path(result.snapshot_file).stat().st_size > 0
    assert Path(result.snapshot_file).parent == tmp_path / cuda.suite / "snapshots"
    assert result.why is not None and result.why.round_to == 512
    assert np.isclose(result.why.peak_bytes, result.metrics.mem_tracked_peak_bytes or 0)


def test_explain_names_the_runs_an_ambiguous_method_matches_and_its_help_example_fits_the_quickstart() -> None:
    import re
    import shlex

    from petlbench.errors import ConfigError
    from petlbench.report.explain import select_run
    from petlbench.report.rows import normalise
    from petlbench.run.sweep import builtin_quickstart
    from petlbench.spec.loading import load_suite

    runs = expand(load_suite(builtin_quickstart()), "cpu")
    rows = normalise(
        pd.DataFrame([RunResult(spec=r, status="ok", created_at="2026-01-01T00:00:00+00:00").to_row() for r in runs])
    )
    with pytest.raises(ConfigError, match=r"2 runs match at batch size 64: 'lora rank=4' and 'lora rank=8'; name one"):
        select_run(rows, None, "lora", 64)
    with pytest.raises(ConfigError, match=r"runs at batch sizes 32, 64; add --batch-size"):
        select_run(rows, None, "fact", None)
    # the example of `petlbench explain --help` names one quickstart run and one to compare it with
    from petlbench.cli.app import explain as explain_command

    doc = explain_command.__doc__ or ""
    example = shlex.split(re.search(r"Example: (petlbench explain .*)", doc).group(1))  # type: ignore[union-attr]
    option = dict(zip(example[3::2], example[4::2], strict=False))
    first = select_run(rows, None, option["--method"], int(option["--batch-size"]))
    second = select_run(rows, None, option["--vs"], int(first["batch_size"]))
    assert first["tuner"] == "fact" and second["variant"] == "lora rank=8"
