"""Suite models of the datasets (torch-free): synthetic tensors, scikit-learn's digits, VTAB-1k task folders and
ImageFolder trees.

Where the files are: a relative `root` is resolved against the data root — `--data-root`, else the
`PETLBENCH_DATA_ROOT` environment variable, else the current directory — so a suite can say `root: vtab-1k` and
run on any machine. The resolved folder is recorded on every result row (never part of the run_id).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Final, Literal, TypeAlias

from pydantic import BaseModel, Field, model_validator

from petlbench.data.vtab_tasks import TASKS_BY_NAME, VTAB_TASKS
from petlbench.spec.base import StrictModel

DATA_ROOT_ENV: Final = "PETLBENCH_DATA_ROOT"
DEFAULT_NUM_WORKERS: Final = 4


class SyntheticData(StrictModel):
    """Random images and labels: for memory and speed only (accuracy is chance)."""

    name: Literal["synthetic"]
    num_classes: int = Field(100, gt=1)
    train_size: int = Field(512, gt=0)
    test_size: int = Field(128, gt=0)


class DigitsData(StrictModel):
    """The 8×8 handwritten digits shipped inside scikit-learn (1,797 real images, 10 classes), resized."""

    name: Literal["digits"]
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share, stratified")
    split_seed: int = Field(0, description="seed of the train/test split (fixed across runs)")


class _FileData(StrictModel):
    num_workers: int = Field(
        DEFAULT_NUM_WORKERS,
        ge=0,
        description="DataLoader worker processes that decode images (0: in the run's process); not part of run_id",
    )


class VtabData(_FileData):
    """One VTAB-1k task in the FacT/NOAH layout (`<root>/<task>/train800val200.txt`, `test.txt`, lines
    `relative/path label`) or the SQT PNG release (`train800val200.json`, `test.json`: a list of
    `{"path": label}` objects, paths relative to `<root>/<task>/images/`)."""

    name: Literal["vtab1k"]
    task: str = Field(description="task folder name, e.g. cifar, dtd, patch_camelyon (docs/methods.md)")
    root: str = Field("vtab-1k", min_length=1, description="folder with one sub-folder per task")
    train_split: Literal["train800val200", "train800", "val200"] = Field(
        "train800val200", description="list the model trains on (the papers' final protocol: all 1000 images)"
    )
    test_split: Literal["test", "val200"] = Field("test", description="list the model is evaluated on")
    list_format: Literal["auto", "txt", "json"] = Field(
        "auto", description="auto: <split>.txt if present, else <split>.json"
    )
    num_classes: int | None = Field(None, gt=1, description="only for a task outside the 19 of VTAB-1k")

    @model_validator(mode="after")
    def _known_task(self) -> VtabData:
        known = TASKS_BY_NAME.get(self.task)
        if known is None and self.num_classes is None:
            close = difflib.get_close_matches(self.task, list(TASKS_BY_NAME), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown VTAB-1k task {self.task!r}; {hint}valid: {', '.join(t.name for t in VTAB_TASKS)} "
                "(or give num_classes for a task of your own)"
            )
        if known is not None and self.num_classes not in (None, known.num_classes):
            raise ValueError(f"{self.task} has {known.num_classes} classes, got num_classes {self.num_classes}")
        return self

    @property
    def classes(self) -> int:
        known = TASKS_BY_NAME.get(self.task)
        return known.num_classes if known is not None else int(self.num_classes or 0)


class ImageFolderData(_FileData):
    """An ImageFolder tree: `<root>/train/<class>/*.png` and `<root>/val/<class>/...` (or `test/`).

    Classes are the sorted sub-folder names of the train split (torchvision's convention); the test split may
    lack a class but not add one.
    """

    name: Literal["imagefolder"]
    root: str = Field(min_length=1, description="folder holding the split folders")
    task: str | None = Field(None, min_length=1, description="label in reports and task_params; default: root's name")
    train_split: str = Field("train", min_length=1)
    test_split: str | None = Field(None, min_length=1, description="default: val if it exists, else test")


DataSpec: TypeAlias = Annotated[SyntheticData | DigitsData | VtabData | ImageFolderData, Field(discriminator="name")]


def task_key(data: BaseModel) -> str:
    """The name a data spec goes by in `task_params` and reports: the VTAB task, an ImageFolder's task (or its
    folder name), else the dataset name (digits, synthetic)."""
    if isinstance(data, VtabData):
        return data.task
    if isinstance(data, ImageFolderData):
        return data.task or Path(data.root).name or data.root
    return str(getattr(data, "name", "data"))


def data_label(data: BaseModel) -> str:
    """Short label for tables: 'vtab1k/dtd', 'imagefolder/pets', 'digits'."""
    name = str(getattr(data, "name", "data"))
    key = task_key(data)
    return name if key == name else f"{name}/{key}"


def resolve_data_root(option: str | Path | None = None) -> Path | None:
    """The folder relative data roots live in: the `--data-root` option, else $PETLBENCH_DATA_ROOT, else None."""
    value = str(option) if option is not None else os.environ.get(DATA_ROOT_ENV)
    if not value:
        return None
    return Path(value).expanduser().absolute()


def resolve_root(root: str, data_root: str | Path | None) -> Path:
    """A data spec's `root` as a folder: absolute as written, else under the data root (or the current dir)."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    base = Path(data_root) if data_root is not None else Path.cwd()
    return (base / path).absolute()
