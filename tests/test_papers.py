"""Published numbers beside ours (petlbench/report/published.py, suites/papers/): the `published:` block, pairing
it with estimate and measured rows, and the shipped paper suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from petlbench.errors import ConfigError
from petlbench.report.published import UNIT_BYTES, compare, markdown_table, mean_abs_deviation
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite
from petlbench.spec.models import Published

ROOT = Path(__file__).resolve().parents[1]
PAPERS = sorted((ROOT / "suites" / "papers").glob("*.yaml"))
GiB = 2**30


def published(**values: Any) -> Published:
    return Published.model_validate(
        {
            "source": "a paper",
            "where": "Table 1",
            "unit": "GiB",
            "conditions": "ViT-B/16, batch 32",
            "assumed": "nothing else",
            "values": [
                {"method": "lora", "label": "LoRA", "value": 3.0},
                {"method": "full", "value": 4.5, "batch_size": 32},
                {"method": "vpt-deep", "value": 4.0, "knob": 50},
            ],
            **values,
        }
    )


def row(method: str, peak: float, source: str = "estimate", **fields: Any) -> dict[str, Any]:
    return {
        "run_id": f"{method}-{source}-{fields}",
        "method": method,
        "status": "ok",
        "memory_source": source,
        "peak_allocated_bytes": peak,
        "batch_size": 32,
        **fields,
    }


def test_compare_pairs_each_published_value_with_its_estimate_and_measured_rows() -> None:
    rows = [
        row("lora", 2.5 * GiB),
        row("lora", 3.2 * GiB, "cuda_allocator"),
        row("full", 5.0 * GiB, batch_size=32),
        row("full", 9.0 * GiB, batch_size=64),  # another batch: not the published one
        row("vpt-deep", 4.0 * GiB, knob=50.0),
        row("vpt-deep", 6.0 * GiB, knob=100.0),
        row("linear", 1.0 * GiB),  # not published: ignored
        row("lora", 1.0 * GiB, "cuda_allocator", status="oom"),  # failed runs do not count
    ]
    lora, full, vpt = compare(published(), rows)
    assert lora.label == "LoRA" and full.label == "full"
    assert lora.published_bytes == 3.0 * GiB
    assert lora.predicted_ratio == pytest.approx(3.0 / 2.5) and lora.measured_ratio == pytest.approx(3.0 / 3.2)
    assert full.predicted_ratio == pytest.approx(0.9) and full.measured_bytes is None and full.measured_ratio is None
    assert vpt.predicted_ratio == pytest.approx(1.0)
    assert mean_abs_deviation([lora, full, vpt]) == pytest.approx((0.2 + 0.1 + 0.0) / 3)
    assert mean_abs_deviation([lora, full, vpt], exclude=["lora"]) == pytest.approx(0.05)
    assert mean_abs_deviation([lora, full, vpt], which="measured") == pytest.approx(abs(3.0 / 3.2 - 1))
    # what a trace leaves out can be added to every prediction
    (lora_ws, *_) = compare(published(), rows, extra_bytes=0.5 * GiB)
    assert lora_ws.predicted_ratio == pytest.approx(1.0)
    table = markdown_table(published(), [lora, full, vpt])
    assert "| LoRA | 3.00 | 2.50 | 1.20 | 3.20 | 0.94 |" in table and "| full | 4.50 | 5.00 | 0.90 | - | - |" in table


def test_several_matching_rows_are_named_not_guessed() -> None:
    rows = [row("lora", 2.5 * GiB, batch_size=32), row("lora", 2.0 * GiB, batch_size=16)]
    lora = compare(published(), rows)[0]  # the LoRA value names no batch size: two rows match
    assert lora.predicted_bytes is None and "2 rows match lora" in lora.note


def test_units() -> None:
    assert UNIT_BYTES["GiB"] == 2**30 and UNIT_BYTES["GB"] == 10**9 and UNIT_BYTES["MiB"] == 2**20
    (lora, *_) = compare(published(unit="MB"), [row("lora", 3.0e6)])
    assert lora.predicted_ratio == pytest.approx(1.0)


def test_a_published_block_is_validated_like_the_rest_of_the_suite() -> None:
    raw = {"name": "p", "data": {"name": "synthetic"}, "tuners": [{"tuner": "lora"}]}
    assert parse_suite(raw).published is None
    block = published().model_dump()
    assert parse_suite({**raw, "published": block}).published == published()
    with pytest.raises(ConfigError, match="unit"):
        parse_suite({**raw, "published": {**block, "unit": "gigs"}})
    with pytest.raises(ConfigError, match="value"):
        parse_suite({**raw, "published": {**block, "values": [{"method": "lora", "value": -1}]}})


@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_every_published_value_of_a_paper_suite_has_exactly_one_run(path: Path) -> None:
    suite = load_suite(path)
    assert suite.published is not None, f"{path.name}: suites/papers/ suites carry a published block"
    runs = expand(suite, "cuda")
    rows = [row(r.method, 1.0, knob=r.knob, batch_size=r.batch_size, precision=r.precision) for r in runs]
    for value, pair in zip(suite.published.values, compare(suite.published, rows), strict=True):
        assert pair.predicted_bytes == 1.0, f"{path.name}: {value.method} matches {pair.note or 'no run'}"


def test_the_dtl_figure_suite_is_shipped() -> None:
    assert ROOT / "suites" / "papers" / "dtl-figure.yaml" in PAPERS
