"""Suite syntax for accuracy sweeps: a list of datasets, per-task tuner knobs, per-tuner train overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.data.vtab_tasks import VTAB_TASKS
from petlbench.errors import ConfigError
from petlbench.spec.expand import expand
from petlbench.spec.loading import load_suite, parse_suite
from petlbench.spec.models import RunSpec

ROOT = Path(__file__).resolve().parents[1]
ACCURACY_VTAB = ROOT / "suites" / "accuracy-vtab.yaml"

BASE: dict[str, Any] = {
    "name": "unit",
    "data": [{"name": "vtab1k", "task": "cifar"}, {"name": "vtab1k", "task": "dtd"}],
    "train": {"epochs": 2},
    "tuners": [
        {
            "tuner": "fact",
            "params": {"variant": "tk", "rank": 8},
            "task_params": {"cifar": {"rank": 32, "scale": 0.1}},
        }
    ],
}


def runs(**overrides: Any) -> list[RunSpec]:
    return expand(parse_suite({**BASE, **overrides}, source="s.yaml"), "cpu")


def test_task_params_override_params_for_their_task_only() -> None:
    cifar, dtd = runs()
    assert (cifar.data.name, getattr(cifar.data, "task", None)) == ("vtab1k", "cifar")
    assert (cifar.tuner_params["rank"], cifar.tuner_params["scale"], cifar.knob) == (32, 0.1, 32.0)
    assert (dtd.tuner_params["rank"], dtd.tuner_params["scale"], dtd.knob) == (8, 1.0, 8.0)
    assert cifar.tuner_params["variant"] == dtd.tuner_params["variant"] == "tk"


def test_run_ids_are_deterministic_and_differ_per_task() -> None:
    first, second = runs(), runs()
    assert [r.run_id for r in first] == [r.run_id for r in second]
    assert len({r.run_id for r in first}) == 2


def test_run_ids_ignore_where_the_data_lives_and_the_loader_workers() -> None:
    base = runs()[0]
    moved = expand(parse_suite(BASE), "cpu", data_root="/elsewhere")[0]
    assert moved.data_root == "/elsewhere" and moved.run_id == base.run_id
    workers = runs(data=[{"name": "vtab1k", "task": "cifar", "num_workers": 0}, {"name": "vtab1k", "task": "dtd"}])
    assert workers[0].run_id == base.run_id
    other_root = runs(data=[{"name": "vtab1k", "task": "cifar", "root": "png"}, {"name": "vtab1k", "task": "dtd"}])
    assert other_root[0].run_id != base.run_id


def test_a_single_dataset_keeps_its_run_ids() -> None:
    """`data: {...}` and `data: [{...}]` are the same runs."""
    single = runs(data={"name": "vtab1k", "task": "cifar"})
    listed = runs(data=[{"name": "vtab1k", "task": "cifar"}])
    assert [r.run_id for r in single] == [r.run_id for r in listed]


@pytest.mark.parametrize(
    ("tuner", "message"),
    [
        (
            {"tuner": "fact", "task_params": {"cifr": {"rank": 4}}},
            "s.yaml: tuners[0].task_params.cifr: no dataset of this suite is task 'cifr'; tasks here: cifar, dtd",
        ),
        (
            {"tuner": "fact", "task_params": {"dtd": {"rnak": 4}}},
            "s.yaml: tuners[0].task_params.dtd.rnak: unknown knob for tuner 'fact'",
        ),
        (
            {"tuner": "fact", "task_params": {"dtd": {"rank": -1}}},
            "s.yaml: tuners[0].task_params.dtd.rank: Input should be greater than 0, got -1",
        ),
        (
            {"tuner": "fact", "grid": {"rank": [4, 8]}, "task_params": {"dtd": {"rank": 16}}},
            "s.yaml: tuners[0].task_params.dtd.rank: also swept in grid; keep one of the two",
        ),
        (
            {"tuner": "lora", "train": {"epochs": 0}},
            "s.yaml: tuners[0].train.epochs: Input should be greater than 0, got 0",
        ),
    ],
)
def test_per_task_and_per_tuner_errors_name_the_field(tuner: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        runs(tuners=[tuner])
    assert str(info.value).splitlines()[0].startswith(message), str(info.value)


def test_unknown_task_and_unknown_data_keys_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"data\[1\]\.task: Value error, unknown VTAB-1k task 'dtdd'|did you mean"):
        runs(data=[{"name": "vtab1k", "task": "cifar"}, {"name": "vtab1k", "task": "dtdd"}])
    with pytest.raises(ConfigError) as info:
        runs(data=[{"name": "vtab1k", "task": "cifar", "split": "test"}])
    assert str(info.value).startswith("s.yaml: data[0].split: unknown key; did you mean 'test_split'? valid keys: ")
    with pytest.raises(ConfigError, match="dtd has 47 classes, got num_classes 10"):
        runs(data={"name": "vtab1k", "task": "dtd", "num_classes": 10})
    custom = runs(data={"name": "vtab1k", "task": "my_task", "num_classes": 3}, tuners=[{"tuner": "linear"}])
    assert custom[0].data.name == "vtab1k"


def test_per_tuner_train_overrides() -> None:
    lora, sqt_like = runs(
        data={"name": "digits"},
        tuners=[{"tuner": "lora"}, {"tuner": "linear", "train": {"epochs": 5, "drop_last": True}}],
    )
    assert lora.train is not None and (lora.train.epochs, lora.train.drop_last) == (2, False)
    assert sqt_like.train is not None and (sqt_like.train.epochs, sqt_like.train.drop_last) == (5, True)
    with pytest.raises(ConfigError, match=r"tuners\[0\]\.train: the suite has no train section"):
        runs(train=None, tuners=[{"tuner": "lora", "train": {"epochs": 5}}])


def test_accuracy_vtab_suite_expands_to_every_task_and_tuner() -> None:
    suite = load_suite(ACCURACY_VTAB)
    specs = expand(suite, "cuda", data_root="/data")
    tasks = [t.name for t in VTAB_TASKS]
    by_tuner: dict[str, list[RunSpec]] = {}
    for spec in specs:
        plus = "+" if spec.tuner_params.get("fusion_size") else ""  # DTL and DTL+ are two entries of one tuner
        by_tuner.setdefault(f"{spec.tuner}{plus} {spec.tuner_params.get('variant', '')}".strip(), []).append(spec)
    for name, group in by_tuner.items():
        assert [getattr(s.data, "task", None) for s in group] == tasks, name
    # paper settings per task (METHODS.md §2.6 and §1.10)
    fact_tk = {getattr(s.data, "task", ""): s.tuner_params for s in by_tuner["fact tk"]}
    assert (fact_tk["cifar"]["rank"], fact_tk["cifar"]["scale"]) == (32, 0.1)
    assert (fact_tk["oxford_iiit_pet"]["rank"], fact_tk["oxford_iiit_pet"]["scale"]) == (16, 10.0)
    fact_tt = {getattr(s.data, "task", ""): s.tuner_params for s in by_tuner["fact tt"]}
    assert (fact_tt["clevr_dist"]["rank"], fact_tt["clevr_dist"]["scale"]) == (4, 10.0)
    assert (fact_tt["svhn"]["rank"], fact_tt["svhn"]["scale"]) == (16, 100.0)
    assert sum(2 * 768 * p["rank"] + p["rank"] ** 3 + 144 * p["rank"] for p in fact_tk.values()) == 1_310_720
    assert sum(2 * 768 * p["rank"] + 144 * p["rank"] ** 2 for p in fact_tt.values()) == 754_944
    sqt = {getattr(s.data, "task", ""): s for s in by_tuner["sqt"]}
    assert (sqt["cifar"].tuner_params["num_queries"], sqt["cifar"].tuner_params["attn_scale"]) == (4, 1.0)
    assert (sqt["dmlab"].tuner_params["num_queries"], sqt["dmlab"].tuner_params["feat_scale"]) == (1, 1.0)
    assert sqt["cifar"].train is not None and sqt["cifar"].train.epochs == 50
    assert sqt["cifar"].optimizer.weight_decay == 1e-2
    # METHODS.md §1.11: 2,613,650 + 9,216 n + 769 C per task averages 2,735,124 over the 19 official configs
    counts = [
        2_613_650 + 9_216 * s.tuner_params["num_queries"] + 769 * t.num_classes
        for t, s in zip(VTAB_TASKS, by_tuner["sqt"], strict=True)
    ]
    assert round(sum(counts) / 19) == 2_735_124
    lora = by_tuner["lora"][0]
    assert (lora.tuner_params["rank"], lora.optimizer.lr, lora.optimizer.weight_decay) == (8, 1e-3, 1e-4)
    assert all(s.backbone.drop_path_rate == 0.1 for s in specs)
    # each method's backbone mode and head init follow its official code, and are recorded on the row
    modes = {
        name: {(s.tuner_params["backbone_mode"], s.tuner_params["head_init"]) for s in g}
        for name, g in by_tuner.items()
    }
    assert modes == {
        "full": {("train", "vpt")},
        "linear": {("eval", "vpt")},
        "lora": {("train", "timm")},
        "vpt": {("eval", "vpt")},
        "fact tt": {("train", "torch")},
        "fact tk": {("train", "torch")},
        "sqt": {("train", "torch")},
        "bitfit": {("train", "torch")},
        "adapter": {("train", "timm")},
        "adaptformer": {("train", "adaptformer")},
        "ssf": {("train", "timm")},
        "vqt": {("eval", "vpt")},
        "dtl": {("train", "timm")},
        "dtl+": {("train", "timm")},
        "lst": {("train", "timm")},
        "noah": {("train", "timm")},
    }
    assert all(s.train is not None and s.train.eval_every == 10 for s in specs)
    assert len({s.run_id for s in specs}) == len(specs)


def test_accuracy_vtab_validates_without_data_or_says_where_it_is_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(ACCURACY_VTAB), "--no-preflight"])
    assert result.exit_code == 0, result.output
    assert "(pre-flight skipped" in result.output
    result = runner.invoke(app, ["validate", str(ACCURACY_VTAB), "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    assert f"data[0] (vtab1k/cifar): {tmp_path / 'vtab-1k'}: no such folder" in result.output


@pytest.mark.slow
def test_accuracy_vtab_validates_against_a_complete_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight reads lists and checks files exist without decoding: empty files stand in for images.
    Offline, the hub tag must be in the Hugging Face cache: a fake cache holds it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--timm--vit_base_patch16_224.orig_in21k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").touch()
    for task in VTAB_TASKS:
        folder = tmp_path / "vtab-1k" / task.name
        (folder / "images").mkdir(parents=True)
        for split in ("train800val200", "test"):
            lines = [f"images/{split}_{label}.jpg {label}\n" for label in range(task.num_classes)]
            (folder / f"{split}.txt").write_text("".join(lines))
            for label in range(task.num_classes):
                (folder / "images" / f"{split}_{label}.jpg").touch()
    result = CliRunner().invoke(app, ["validate", str(ACCURACY_VTAB), "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "data[18] vtab1k/smallnorb_ele: 9 train (train800val200.txt), 9 test (test.txt), 9 classes" in (
        result.output
    )
