"""Suites: parsing, deterministic expansion, run ids, and one-line errors for malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest

from petlbench.errors import ConfigError, DeviceError
from petlbench.executors.devices import resolve_device
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite
from petlbench.spec.models import RunSpec
from petlbench.tuners import TUNERS

BASE = """\
name: t
data: {name: synthetic, num_classes: 10}
backbone: {model: test_vit, img_size: 32, kwargs: {patch_size: 8, depth: 3}}
"""


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_expansion_is_a_deterministic_cartesian_product(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """\
batch_size: [8, 16]
precision: [fp32, bf16-mixed]
tuners:
  - tuner: full
  - tuner: lora
    grid: {rank: [4, 8]}
    optimizer: {lr: 0.01}
""",
    )
    runs = expand(load_suite(path), "cpu")
    assert len(runs) == (1 + 2) * 2 * 2
    assert [(r.tuner, r.knob, r.precision, r.batch_size) for r in runs[:5]] == [
        ("full", None, "fp32", 8),
        ("full", None, "fp32", 16),
        ("full", None, "bf16-mixed", 8),
        ("full", None, "bf16-mixed", 16),
        ("lora", 4.0, "fp32", 8),
    ]
    lora = [r for r in runs if r.tuner == "lora"]
    assert {r.optimizer.lr for r in lora} == {0.01}
    assert {r.optimizer.lr for r in runs if r.tuner == "full"} == {1e-3}
    assert lora[0].knob_name == "rank" and lora[0].tuner_params["rank"] == 4
    # defaults are filled in, so the stored spec is complete
    assert lora[0].tuner_params["targets"] == ["q", "v"]
    # same suite, same ids; every id unique
    again = expand(load_suite(path), "cpu")
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert len({r.run_id for r in runs}) == len(runs)


def test_run_id_tracks_what_changes_a_number(tmp_path: Path) -> None:
    run = expand(load_suite(write(tmp_path, BASE + "tuners: [{tuner: full}]\n")), "cpu")[0]
    assert run.run_id == RunSpec.model_validate_json(run.model_dump_json()).run_id
    assert run.model_copy(update={"suite": "other", "timeout_s": 5.0}).run_id == run.run_id
    assert run.model_copy(update={"batch_size": 9}).run_id != run.run_id
    assert run.model_copy(update={"device": "cuda"}).run_id != run.run_id
    assert len(run.run_id) == 12


def test_suite_name_defaults_to_file_stem(tmp_path: Path) -> None:
    text = BASE.replace("name: t\n", "") + "tuners: [{tuner: linear}]\n"
    assert load_suite(write(tmp_path, text, "my-suite.yaml")).name == "my-suite"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "tuners: [{tuner: full}]\nbogus: 1\n", "bogus: unknown key; valid keys: auto_batch, backbone"),
        (BASE + "tuners: [{tuner: lroa}]\n", "tuners[0].tuner: unknown tuner 'lroa'; did you mean 'lora'? valid: "),
        (BASE + "tuners: [{tuner: lora, grid: {rank: [4, -4]}}]\n", "tuners[0].grid.rank: Input should be greater"),
        (BASE + "tuners: [{tuner: lora, params: {rank: -4}}]\n", "tuners[0].params.rank: Input should be greater"),
        (
            BASE + "tuners: [{tuner: lora, params: {rnak: 4}}]\n",
            "tuners[0].params.rnak: unknown knob for tuner 'lora'; did you mean 'rank'?",
        ),
        (BASE + "tuners: [{tuner: lora, grid: {rank: []}}]\n", "tuners[0].grid.rank: empty list"),
        (BASE + "tuners: []\n", "tuners: List should have at least 1 item"),
        (BASE + "batch_size: []\ntuners: [{tuner: full}]\n", "batch_size: empty list"),
        (BASE + "batch_size: [0]\ntuners: [{tuner: full}]\n", "batch_size: must be > 0, got 0"),
        (BASE + "precision: fp8\ntuners: [{tuner: full}]\n", "precision: Input should be 'fp32'"),
        (BASE + "tuners: [{tuner: full, optimizer: {lr: -1}}]\n", "tuners[0].optimizer.lr: Input should be greater"),
        (BASE.replace("synthetic", "digitz") + "tuners: [{tuner: full}]\n", "data.name: unknown value 'digitz'"),
        (BASE + "backbone: {model: x}\ntuners: [{tuner: full}]\n", "duplicate key 'backbone'"),
        (BASE + "tuners: [{tuner: full}, {tuner: full}]\n", "tuners[1]: repeats a run of tuners[0]"),
        (BASE + "tuners:\n  - tuner: lora\n    grid: {rank: [4\n", "YAML syntax error"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)
def test_malformed_suites_fail_with_one_line_naming_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message
    assert len(message.splitlines()) == 1, message


def test_unknown_tuner_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_suite(write(tmp_path, BASE + "tuners: [{tuner: nope}]\n"))
    assert str(info.value).endswith("valid: " + ", ".join(sorted(TUNERS)))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_suite(tmp_path)


def test_device_resolution() -> None:
    assert resolve_device("cpu", ["0"]) == "cpu"
    assert resolve_device("auto", []) == "cpu"
    assert resolve_device("auto", ["0"]) == "cuda"
    assert resolve_device("cuda", ["0"]) == "cuda"
    with pytest.raises(DeviceError, match=r"no NVIDIA GPU is visible.*use --device cpu"):
        resolve_device("cuda", [])


def test_shipped_suites_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in [*sorted((root / "suites").glob("*.yaml")), root / "petlbench" / "suites" / "quickstart.yaml"]:
        if path.name.startswith("budgets"):  # budgets files, not suites
            continue
        assert expand(load_suite(path), "cpu"), path


def test_train_batch_sizes_trains_some_batch_sizes_and_measures_the_others(tmp_path: Path) -> None:
    head = BASE + "batch_size: [8, 16]\ntuners: [{tuner: lora}]\n"
    every = expand(load_suite(write(tmp_path, head + "train: {epochs: 2}\n", "a.yaml")), "cpu")
    some = expand(load_suite(write(tmp_path, head + "train: {epochs: 2, batch_sizes: [8]}\n", "b.yaml")), "cpu")
    assert [(r.batch_size, r.train is not None) for r in some] == [(8, True), (16, False)]
    # the trained run is the run it always was (the list stays with the suite)
    assert some[0].run_id == every[0].run_id and some[1].run_id != every[1].run_id
    for text, message in (
        ("train: {epochs: 2, batch_sizes: [32]}\n", r"train.batch_sizes: \[32\] not among the suite's batch sizes"),
        ("train: {epochs: 2, batch_sizes: []}\n", "train.batch_sizes: List should have at least 1 item"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_suite(write(tmp_path, head + text, "bad.yaml"))
    auto = BASE + "batch_size: auto\ntuners: [{tuner: lora}]\ntrain: {epochs: 2, batch_sizes: [8]}\n"
    with pytest.raises(ConfigError, match="not with batch_size: auto"):
        load_suite(write(tmp_path, auto, "auto.yaml"))
