"""batch_size: auto — the pure search over a stubbed "does batch b fit?", the real-run driver with a stub executor,
and the suite syntax with its one-line errors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from petlbench.columns import Metrics
from petlbench.errors import ConfigError
from petlbench.estimate.autobatch import linear_seed, search_max_batch
from petlbench.estimate.client import Estimate
from petlbench.executors import RunEvent, RunFinished, RunStarted
from petlbench.results import RunResult, load_results, now_iso, suite_dir
from petlbench.run.batch_search import AutoBatchOutcome, run_auto_batch, stored_probes
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite
from petlbench.spec.models import RunSpec
from tests.conftest import TINY_BACKBONE


class Threshold:
    """fits(b) ⇔ b ≤ limit, counting calls."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[int] = []

    def __call__(self, batch: int) -> bool:
        self.calls.append(batch)
        return batch <= self.limit


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 9, 100, 511, 512, 513, 4095])
@pytest.mark.parametrize("seed", [None, 1, 50, 512, 4096])
def test_search_finds_the_largest_fitting_batch_from_any_seed(limit: int, seed: int | None) -> None:
    fits = Threshold(limit)
    result = search_max_batch(fits, lo=1, hi=4096, seed=seed)
    assert result.best == limit
    assert result.first_over == limit + 1  # the next size was probed and did not fit
    assert len(fits.calls) == len(set(fits.calls)), "a batch was probed twice"
    assert [p.batch for p in result.probes] == fits.calls
    assert all(p.fits == (p.batch <= limit) for p in result.probes)
    assert len(fits.calls) <= 2 * 13 + 2  # gallop + bisection: logarithmic


def test_an_exact_seed_costs_two_probes() -> None:
    fits = Threshold(777)
    result = search_max_batch(fits, lo=1, hi=4096, seed=777)
    assert fits.calls == [777, 778]
    assert (result.best, result.first_over) == (777, 778)


def test_seed_too_high_gallops_down_and_too_low_gallops_up() -> None:
    down = Threshold(100)
    assert search_max_batch(down, seed=130).best == 100
    assert down.calls[:4] == [130, 129, 127, 123]
    up = Threshold(100)
    assert search_max_batch(up, seed=70).best == 100
    assert up.calls[:4] == [70, 71, 73, 77]


def test_multiple_of_limits_probes_to_multiples() -> None:
    fits = Threshold(100)
    result = search_max_batch(fits, lo=8, hi=1024, multiple_of=8, seed=50)
    assert all(b % 8 == 0 for b in fits.calls)
    assert (result.best, result.first_over) == (96, 104)


def test_nothing_fits_and_everything_fits() -> None:
    none = search_max_batch(Threshold(0), lo=1, hi=64, seed=32)
    assert none.best is None and none.first_over == 1
    everything = search_max_batch(Threshold(10**6), lo=1, hi=64, seed=32)
    assert everything.best == 64 and everything.first_over is None


def test_a_failing_probe_propagates() -> None:
    def broken(batch: int) -> bool:
        raise RuntimeError(f"probe {batch} crashed")

    with pytest.raises(RuntimeError, match="probe 5 crashed"):
        search_max_batch(broken, seed=5)


def test_bad_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="bad search range"):
        search_max_batch(Threshold(1), lo=10, hi=5)
    with pytest.raises(ValueError, match="no multiple of 16"):
        search_max_batch(Threshold(1), lo=1, hi=15, multiple_of=16)


def test_linear_seed_solves_for_the_limit() -> None:
    # peak = 100 + 10·b → limit 1000 at b = 90
    assert linear_seed(1, 110, 9, 190, 1000) == 90
    assert linear_seed(4, 500, 4, 500, 1000) == 4  # one point: start there


# ---------------------------------------------------------------------------------------------------------------
# The real-run driver, with a stub executor instead of worker processes

PEAK_PER_SAMPLE = 1000
BASE = 5000


class StubExecutor:
    """Pretends to run: peak = BASE + PEAK_PER_SAMPLE·batch; batches in `oom_from` and up end `oom`."""

    def __init__(self, oom_from: int | None = None, error_at: int | None = None) -> None:
        self.ran: list[int] = []
        self.oom_from = oom_from
        self.error_at = error_at

    def execute(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        for spec in specs:
            self.ran.append(spec.batch_size)
            yield RunStarted(spec)
            b = spec.batch_size
            if self.error_at == b:
                yield RunFinished(RunResult(spec=spec, status="error", error="boom", created_at=now_iso()))
            elif self.oom_from is not None and b >= self.oom_from:
                yield RunFinished(RunResult(spec=spec, status="oom", error="out of memory", created_at=now_iso()))
            else:
                metrics = Metrics(memory_source="cpu_tracker", peak_allocated_bytes=BASE + PEAK_PER_SAMPLE * b)
                yield RunFinished(RunResult(spec=spec, status="ok", metrics=metrics, created_at=now_iso()))


def templates() -> list[RunSpec]:
    suite = parse_suite(
        {
            "name": "auto",
            "device": "cpu",
            "data": {"name": "synthetic", "num_classes": 10},
            "backbone": TINY_BACKBONE.model_dump(),
            "batch_size": "auto",
            "tuners": [{"tuner": "linear"}, {"tuner": "lora"}],
        }
    )
    return expand(suite, "cpu")


def drive(tmp_path: Path, executor: StubExecutor, seeds: dict[str, int | None], limit: int) -> list:  # type: ignore[type-arg]
    specs = templates()
    estimates = {s.run_id: Estimate(run_id=s.run_id, max_batch=seeds.get(s.tuner)) for s in specs}
    stored = stored_probes(suite_dir(tmp_path, "auto"))
    events = run_auto_batch(specs, estimates, limit, executor, tmp_path, stored, 1, 4096, 1)
    return [event for event in events if isinstance(event, AutoBatchOutcome)]


def test_driver_confirms_the_estimate_keeps_every_probe_and_resumes(tmp_path: Path) -> None:
    limit = BASE + PEAK_PER_SAMPLE * 40  # batch 40 fits exactly, 41 does not
    executor = StubExecutor()
    outcomes = drive(tmp_path, executor, {"linear": 40, "lora": 30}, limit)
    assert [o.search.best for o in outcomes] == [40, 40]
    assert [o.search.first_over for o in outcomes] == [41, 41]
    assert outcomes[0].predicted == 40 and len(outcomes[0].results) == 2  # exact seed: 40 ✓, 41 ✗
    assert outcomes[1].best_result is not None and outcomes[1].best_result.spec.batch_size == 40
    frame = load_results([suite_dir(tmp_path, "auto")])
    assert len(frame) == len(executor.ran) and frame["run_id"].is_unique  # every probe is a row
    assert set(frame["memory_limit_bytes"]) == {limit}
    # a rerun replays the search from the stored rows and runs nothing
    again = StubExecutor()
    outcomes = drive(tmp_path, again, {"linear": 40, "lora": 30}, limit)
    assert again.ran == [] and [o.search.best for o in outcomes] == [40, 40]


def test_oom_and_over_limit_do_not_fit_and_an_error_stops_the_search(tmp_path: Path) -> None:
    limit = BASE + PEAK_PER_SAMPLE * 100
    outcomes = drive(tmp_path, StubExecutor(oom_from=60), {"linear": 80, "lora": None}, limit)
    assert outcomes[0].search.best == 59 and outcomes[0].search.first_over == 60  # OOM from 60 on
    assert outcomes[1].search.best == 59
    failed = drive(tmp_path / "other", StubExecutor(error_at=81), {"linear": 80, "lora": 80}, limit)
    assert failed[0].search is None and "probe at batch 81 ended error: boom" in (failed[0].failure or "")
    assert failed[1].search is None  # same batch sizes, same failure


# ---------------------------------------------------------------------------------------------------------------
# Suite syntax

BASE_SUITE = """\
name: t
device: cpu
data: {name: synthetic, num_classes: 10}
backbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 3}}
tuners: [{tuner: full}, {tuner: lora, grid: {rank: [4, 8]}}]
"""


def test_auto_suite_expands_to_one_template_per_configuration(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(BASE_SUITE + "batch_size: auto\nauto_batch: {min: 8, max: 512, multiple_of: 8}\n")
    suite = load_suite(path)
    assert suite.auto_batch_size and suite.batch_range.max == 512
    runs = expand(suite, "cpu")
    assert [(r.tuner, r.knob, r.batch_size) for r in runs] == [("full", None, 8), ("lora", 4.0, 8), ("lora", 8.0, 8)]
    path.write_text(BASE_SUITE + "batch_size: auto\n")
    assert load_suite(path).batch_range.min == 1  # defaults without an auto_batch section


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("batch_size: autoo\n", "batch_size: must be a positive integer, a list of them, or 'auto', got 'autoo'"),
        ("batch_size: [auto, 8]\n", "batch_size: 'auto' cannot be combined with other batch sizes"),
        ("batch_size: [8, x]\n", "batch_size: must be a positive integer, a list of them, or 'auto'; item 1 is 'x'"),
        ("batch_size: 8\nauto_batch: {min: 2}\n", "auto_batch: only used with batch_size: auto, got batch_size 8"),
        ("batch_size: auto\nauto_batch: {min: 8, max: 4}\n", "auto_batch: max must be >= min (8), got 4"),
        ("batch_size: auto\nauto_batch: {min: 0}\n", "auto_batch.min: Input should be greater than 0, got 0"),
        ("batch_size: auto\nauto_batch: {min: 3, multiple_of: 2}\n", "auto_batch: min must be a multiple of"),
        (
            "batch_size: auto\nauto_batch: {mx: 8}\n",
            "auto_batch.mx: unknown key; did you mean 'max'? valid keys: max, min, multiple_of",
        ),
        ("batch_size: auto\nname: x.estimate\n", "name: names ending in '.estimate' are reserved"),
    ],
)
def test_auto_batch_errors_are_one_line_naming_the_field(tmp_path: Path, extra: str, expected: str) -> None:
    path = tmp_path / "s.yaml"
    text = BASE_SUITE.replace("name: t\n", "") if extra.startswith("batch_size: auto\nname") else BASE_SUITE
    path.write_text(text + extra)
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message, message
    assert len(message.splitlines()) == 1, message
