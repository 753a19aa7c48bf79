"""File-based datasets: VTAB-1k lists (text and JSON), ImageFolder trees, the pre-flight and the worker's loader.

Every malformed-data case exits 2 with one line naming the file (and the line of a list file): the cheap ones in
the parent's pre-flight before any run starts, an undecodable image in the worker after the other runs finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from petlbench.cli.app import app
from petlbench.data.files import index_data
from petlbench.data.loaders import FileSource, load_data
from petlbench.data.specs import DATA_ROOT_ENV, ImageFolderData, VtabData
from petlbench.errors import DataError
from petlbench.results import load_results, write_result
from petlbench.run.worker import execute
from petlbench.spec.expand import expand
from petlbench.spec.loading import parse_suite
from petlbench.tuners import TUNERS
from tests.conftest import TINY_BACKBONE
from tests.datagen import make_data_root, make_imagefolder, make_vtab_task, write_png

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"))


def vtab(task: str, **extra: Any) -> VtabData:
    return VtabData.model_validate({"name": "vtab1k", "task": task, "num_workers": 0, **extra})


# ---------------------------------------------------------------------------------------------------------------
# Index


def test_text_and_json_lists_index_the_same_way(data_root: Path) -> None:
    kitti = index_data(vtab("kitti"), data_root)
    assert (kitti.num_classes, len(kitti.train), len(kitti.test)) == (4, 16, 8)
    assert (kitti.train_split, kitti.test_split) == ("train800val200.txt", "test.txt")
    assert kitti.folder == data_root / "vtab-1k" / "kitti"
    assert kitti.train[0].path == str(data_root / "vtab-1k/kitti/images/train/0_0.png")
    assert kitti.train[0].origin == f"{data_root / 'vtab-1k/kitti/train800val200.txt'}:1"
    camelyon = index_data(vtab("patch_camelyon"), data_root)
    assert (camelyon.num_classes, len(camelyon.train), len(camelyon.test)) == (2, 8, 4)
    assert camelyon.test_split == "test.json"
    assert camelyon.train[0].path == str(data_root / "vtab-1k/patch_camelyon/images/train/0_0.png")
    assert {s.label for s in camelyon.train} == {0, 1}
    # the fingerprint is the content's identity, not the folder's
    assert index_data(vtab("kitti", root=str(data_root / "vtab-1k")), None).fingerprint == kitti.fingerprint
    assert camelyon.fingerprint != kitti.fingerprint


def test_other_splits_and_formats(data_root: Path) -> None:
    search = index_data(vtab("kitti", train_split="train800", test_split="val200"), data_root)
    assert (len(search.train), len(search.test)) == (12, 4)
    with pytest.raises(DataError, match=r"kitti/train800val200\.json: no such list file"):
        index_data(vtab("kitti", list_format="json"), data_root)


def test_imagefolder_classes_and_default_test_split(data_root: Path) -> None:
    index = index_data(ImageFolderData(name="imagefolder", root="pets"), data_root)
    assert index.classes == ("cat", "dog", "fox") and index.num_classes == 3
    assert (index.train_split, index.test_split, index.task) == ("train", "val", "pets")
    assert (len(index.train), len(index.test)) == (12, 6)
    assert [s.label for s in index.test] == [0, 0, 1, 1, 2, 2]


def test_relative_roots_resolve_under_the_env_var(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(data_root))
    source = load_data(vtab("kitti"))
    assert isinstance(source, FileSource) and source.index.folder == data_root / "vtab-1k" / "kitti"


# ---------------------------------------------------------------------------------------------------------------
# Loader


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_matches_the_papers_pipeline(data_root: Path, num_workers: int) -> None:
    source = load_data(vtab("kitti", num_workers=num_workers), data_root)
    x, y = next(iter(source.batches("test", 8, 24, shuffle=False, seed=0)))
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # torchvision's Resize((24, 24), interpolation=3) on a PIL image is PIL's bicubic; then ToTensor and Normalize
    with Image.open(data_root / "vtab-1k/kitti/images/test/0_0.png") as image:
        pixels = np.asarray(image.convert("RGB").resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (expected - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    torch.testing.assert_close(x[0], expected)


def test_shuffle_is_seeded_and_drop_last_drops(data_root: Path) -> None:
    source = load_data(vtab("kitti"), data_root)

    def labels(seed: int, drop_last: bool = False) -> list[int]:
        batches = source.batches("train", 5, 8, shuffle=True, seed=seed, drop_last=drop_last)
        return [int(v) for _, y in batches for v in y]

    assert labels(1) == labels(1) != labels(2)
    assert len(labels(1)) == 16 and len(labels(1, drop_last=True)) == 15


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_undecodable_image_is_one_data_error_naming_it(tmp_path: Path, num_workers: int) -> None:
    folder = make_vtab_task(tmp_path / "vtab-1k", "kitti", 4)
    bad = folder / "images" / "test" / "2_1.png"
    bad.write_bytes(b"not a png")
    source = load_data(vtab("kitti", num_workers=num_workers), tmp_path)
    with pytest.raises(DataError) as info:
        list(source.batches("test", 4, 8, shuffle=False, seed=0))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}: cannot decode image (listed at {folder / 'test.txt'}:6)")


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight: each malformed case exits 2 at once, naming the file (and the line)


def write_suite(path: Path, data: Any, tuners: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    suite = {
        "name": path.stem,
        "device": "cpu",
        "backbone": TINY_BACKBONE.model_dump(),
        "data": data,
        "batch_size": 8,
        "measure": {"warmup_steps": 2, "steps": 1, "breakdown": False, "inference": False},
        "train": {"epochs": 1},
        "tuners": tuners or [{"tuner": "linear"}],
        **extra,
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def break_nothing(folder: Path) -> str:
    return ""


def missing_task(folder: Path) -> str:
    for child in sorted(folder.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    folder.rmdir()
    return f"{folder}: no such task folder"


def missing_list(folder: Path) -> str:
    (folder / "test.txt").unlink()
    return f"{folder / 'test.txt'}: no such list file"


def empty_list(folder: Path) -> str:
    (folder / "test.txt").write_text("\n")
    return f"{folder / 'test.txt'}: empty list"


def malformed_line(folder: Path) -> str:
    lines = (folder / "test.txt").read_text().splitlines()
    lines[2] = "images/test/1_0.png"
    (folder / "test.txt").write_text("\n".join(lines) + "\n")
    return f"{folder / 'test.txt'}:3: expected 'relative/path label'"


def label_out_of_range(folder: Path) -> str:
    lines = (folder / "train800val200.txt").read_text().splitlines()
    lines[4] = "images/train/1_0.png 4"
    (folder / "train800val200.txt").write_text("\n".join(lines) + "\n")
    return f"{folder / 'train800val200.txt'}:5: label 4 out of range; kitti has 4 classes (0..3)"


def missing_image(folder: Path) -> str:
    (folder / "images" / "test" / "3_1.png").unlink()
    return f"{folder / 'test.txt'}:8: {folder / 'images/test/3_1.png'}: no such image file"


@pytest.mark.parametrize(
    "damage",
    [missing_task, missing_list, empty_list, malformed_line, label_out_of_range, missing_image],
)
def test_broken_vtab_task_fails_validate_and_run_with_exit_2(
    tmp_path: Path, damage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_vtab_task(tmp_path / "data" / "vtab-1k", "kitti", 4)
    expected = damage(folder)
    suite = write_suite(tmp_path / "broken.yaml", [{"name": "vtab1k", "task": "kitti"}])
    for command in (["validate", str(suite)], ["run", str(suite), "--results-dir", str(tmp_path / "results")]):
        result = runner.invoke(app, [*command, "--data-root", str(tmp_path / "data")])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
        assert errors[0].startswith(f"error: {suite}: data[0] (vtab1k/kitti): "), errors[0]
        assert expected in errors[0]
    assert not (tmp_path / "results").exists()  # nothing ran


def test_broken_json_list_names_the_item(tmp_path: Path) -> None:
    folder = make_vtab_task(tmp_path / "vtab-1k", "patch_camelyon", 2, fmt="json")
    items = json.loads((folder / "test.json").read_text())
    items[3] = {"test/1_0.png": 7}
    (folder / "test.json").write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"test\.json: item 3: label 7 out of range; patch_camelyon has 2 classes"):
        index_data(vtab("patch_camelyon"), tmp_path)
    items[3] = ["test/1_0.png", 1]
    (folder / "test.json").write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"test\.json: item 3: expected one \{\"relative/path\": label\} object"):
        index_data(vtab("patch_camelyon"), tmp_path)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda root: os.rename(root / "val", root / "holdout"), "{root}/val: no such split folder (val/ or test/"),
        (lambda root: (root / "train" / "emu").mkdir(), "{root}/train/emu: empty class folder"),
        (lambda root: write_png(root / "val" / "yak" / "0.png", 0, 0), "{root}/val/yak: class folder not in train/"),
    ],
)
def test_broken_imagefolder_fails_validate(tmp_path: Path, damage: Any, expected: str) -> None:
    root = make_imagefolder(tmp_path / "pets")
    damage(root)
    suite = write_suite(tmp_path / "broken.yaml", {"name": "imagefolder", "root": str(root)})
    result = runner.invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2, result.output
    assert f"error: {suite}: data (imagefolder/pets): {expected.format(root=root)}" in result.output


def test_missing_data_root_is_one_clear_line_and_no_preflight_skips_it(tmp_path: Path) -> None:
    suite = write_suite(tmp_path / "s.yaml", [{"name": "vtab1k", "task": "kitti"}])
    result = runner.invoke(app, ["validate", str(suite), "--data-root", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and f"error: --data-root {tmp_path / 'nowhere'}: no such folder" in result.output
    result = runner.invoke(app, ["validate", str(suite), "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path / 'vtab-1k'}: no such folder (VTAB-1k root 'vtab-1k'); set --data-root" in result.output
    result = runner.invoke(app, ["validate", str(suite), "--no-preflight"])
    assert result.exit_code == 0 and "valid, 1 runs (pre-flight skipped" in result.output


def test_validate_prints_the_resolved_datasets(data_root: Path, tmp_path: Path) -> None:
    data = [{"name": "vtab1k", "task": "kitti"}, {"name": "imagefolder", "root": "pets"}]
    suite = write_suite(tmp_path / "ok.yaml", data)
    result = runner.invoke(app, ["validate", str(suite)], env={DATA_ROOT_ENV: str(data_root)})
    assert result.exit_code == 0, result.output
    assert f"data[0] vtab1k/kitti: 16 train (train800val200.txt), 8 test (test.txt), 4 classes, {data_root}" in (
        result.output.replace("\n", "")
    )
    assert "data[1] imagefolder/pets: 12 train (train), 6 test (val), 3 classes" in result.output
    assert "valid, 2 runs" in result.output


def test_missing_checkpoint_fails_the_preflight(tmp_path: Path, data_root: Path) -> None:
    backbone = {**TINY_BACKBONE.model_dump(), "weights": str(tmp_path / "vit.safetensors")}
    suite = write_suite(tmp_path / "s.yaml", {"name": "digits"}, backbone=backbone)
    result = runner.invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2
    assert f"backbone.weights: {tmp_path / 'vit.safetensors'}: no such checkpoint file" in result.output


# ---------------------------------------------------------------------------------------------------------------
# Runs on real files


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """`measure.cpu_threads` sets torch's thread count for the process; in-process runs must give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_tuner_trains_on_vtab_and_imagefolder(data_root: Path, tmp_path: Path, restore_threads: None) -> None:
    """Every tuner on a VTAB-1k task (text lists); three on a JSON-list task and an ImageFolder: one ok accuracy
    row per run. The loaders do not depend on the tuner, so the other two datasets take one of each kind."""

    def suite(data: list[dict[str, object]], tuners: list[str]) -> dict[str, object]:
        return {
            "name": "files",
            "device": "cpu",
            "backbone": TINY_BACKBONE.model_dump(),
            "data": data,
            "batch_size": 8,
            "optimizer": {"lr": 1e-2},
            "measure": {"warmup_steps": 2, "steps": 1, "breakdown": False, "inference": False, "cpu_threads": 1},
            "train": {"epochs": 2, "eval_every": 1},
            "tuners": [{"tuner": name} for name in tuners],
        }

    others = [
        {"name": "vtab1k", "task": "patch_camelyon", "num_workers": 1},
        {"name": "imagefolder", "root": "pets", "num_workers": 0},
    ]
    runs = [
        *expand(
            parse_suite(suite([{"name": "vtab1k", "task": "kitti", "num_workers": 0}], sorted(TUNERS))),
            "cpu",
            data_root=str(data_root),
        ),
        *expand(parse_suite(suite(others, ["full", "linear", "lora"])), "cpu", data_root=str(data_root)),
    ]
    assert len(runs) == len(TUNERS) + 2 * 3
    for spec in runs:
        result = execute(spec)
        assert result.status == "ok", (spec.label(), result.error)
        write_result(tmp_path, result)
    frame = load_results([tmp_path]).set_index(["data.task", "tuner"], drop=False)
    assert len(frame) == len(runs) and frame["acc_top1"].notna().all() and frame["acc_top1_best"].notna().all()
    assert set(frame["dataset"]) == {"vtab1k/kitti", "vtab1k/patch_camelyon", "imagefolder/pets"}
    kitti = frame.loc[("kitti", "linear")]
    assert (kitti["data_task"], kitti["data_train_split"], kitti["data_test_split"]) == (
        "kitti",
        "train800val200.txt",
        "test.txt",
    )
    assert (kitti["num_train"], kitti["num_test"], kitti["num_classes"]) == (16, 8, 4)
    assert kitti["data_folder"] == str(data_root / "vtab-1k" / "kitti") and len(kitti["data_fingerprint"]) == 12
    assert kitti["weights_source"] == "random" and kitti["weights_ref"] is None
    assert kitti["env.torch_threads"] == 1  # measure.cpu_threads, recorded as in effect
    pets = frame[frame["dataset"] == "imagefolder/pets"].iloc[0]
    assert (pets["data_task"], pets["data_test_split"], pets["num_classes"]) == ("pets", "val", 3)
    camelyon = frame.loc[("patch_camelyon", "full")]
    assert camelyon["data_test_split"] == "test.json" and camelyon["num_classes"] == 2
    # the colours are easy: full fine-tuning beats chance on every dataset
    full = frame[frame["tuner"] == "full"]
    assert (full["acc_top1_best"] > 1 / full["num_classes"]).all()


@pytest.mark.slow
def test_a_bad_image_in_a_worker_exits_2_and_keeps_the_other_results(tmp_path: Path) -> None:
    """The pre-flight cannot see that an image does not decode; the worker reports it, `run` exits 2."""
    root = make_data_root(tmp_path / "data")
    bad = root / "pets" / "val" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG garbage")
    suite = write_suite(
        tmp_path / "files.yaml", [{"name": "vtab1k", "task": "kitti"}, {"name": "imagefolder", "root": "pets"}]
    )
    results = tmp_path / "results"
    env = {DATA_ROOT_ENV: str(root), "PYTHONPATH": str(ROOT)}
    outcome = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)], env=env)
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error: /")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot decode image"), outcome.output
    assert "1 runs failed on their configuration or data" in outcome.output
    frame = load_results([results]).set_index("data_task")
    assert frame.loc["kitti", "status"] == "ok" and frame.loc["kitti", "acc_top1"] is not None
    assert frame.loc["pets", "status"] == "error" and frame.loc["pets", "error_type"] == "DataError"
    assert str(bad) in frame.loc["pets", "error"]
    # a rerun skips the finished run and retries the failed one
    bad.unlink()
    write_png(bad, 1, 7)
    outcome = runner.invoke(app, ["run", str(suite), "--results-dir", str(results)], env=env)
    assert outcome.exit_code == 0, outcome.output
    assert "1 done, 1 to run, 1 retried" in outcome.output
