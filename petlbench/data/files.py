"""Index a file-based dataset without decoding it (torch-free): which images, which labels, which classes.

The same function serves the parent's pre-flight (so `petlbench validate`/`run` stop with exit code 2 before any
run starts) and the worker (which then decodes the listed images). Every problem is one `DataError` line that
names the file, and the line for list files: a missing folder, a missing or empty list, a malformed line, a label
outside the task's classes, a listed image that does not exist. Decoding errors can only be found by decoding;
the worker reports those the same way (see `petlbench.data`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from petlbench.data.specs import DATA_ROOT_ENV, ImageFolderData, VtabData, resolve_root, task_key
from petlbench.errors import DataError

IMAGE_EXTENSIONS: Final = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
_HINT: Final = f"set --data-root or ${DATA_ROOT_ENV} to the folder that holds it, or give an absolute root"


@dataclass(frozen=True)
class Sample:
    """One image: absolute path, integer label, and where it was listed (for error messages)."""

    path: str
    label: int
    origin: str


@dataclass(frozen=True)
class FileIndex:
    """A resolved file-based dataset: what the worker loads and what every result row records."""

    kind: str  # vtab1k | imagefolder
    task: str
    folder: Path  # the task folder (VTAB) or the ImageFolder root
    train_split: str  # list file name (train800val200.txt) or split folder name (train)
    test_split: str
    num_classes: int
    classes: tuple[str, ...]  # ImageFolder class names (label order); empty for VTAB lists
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    fingerprint: str  # short sha256 of (split, relative path, label) of every sample: the dataset's identity

    def samples(self, split: str) -> tuple[Sample, ...]:
        return self.train if split == "train" else self.test


def index_data(spec: VtabData | ImageFolderData, data_root: str | Path | None) -> FileIndex:
    """Resolve and check a file-based dataset; raises DataError (one line naming the file) on any problem."""
    if isinstance(spec, VtabData):
        return _index_vtab(spec, data_root)
    return _index_imagefolder(spec, data_root)


# ---------------------------------------------------------------------------------------------------------------
# VTAB-1k lists


def _index_vtab(spec: VtabData, data_root: str | Path | None) -> FileIndex:
    collection = resolve_root(spec.root, data_root)
    if not collection.is_dir():
        raise DataError(f"{collection}: no such folder (VTAB-1k root {spec.root!r}); {_HINT}")
    folder = collection / spec.task
    if not folder.is_dir():
        present = sorted(p.name for p in collection.iterdir() if p.is_dir())[:8]
        raise DataError(f"{folder}: no such task folder; {collection} has {', '.join(present) or 'no folders'}")
    classes = spec.classes
    train_file = _list_file(folder, spec.train_split, spec.list_format)
    test_file = _list_file(folder, spec.test_split, spec.list_format)
    train = _read_list(train_file, folder, classes, spec.task)
    test = _read_list(test_file, folder, classes, spec.task)
    _check_exist([*train, *test])
    return FileIndex(
        kind="vtab1k",
        task=spec.task,
        folder=folder,
        train_split=train_file.name,
        test_split=test_file.name,
        num_classes=classes,
        classes=(),
        train=train,
        test=test,
        fingerprint=_fingerprint(folder, train, test),
    )


def _list_file(folder: Path, split: str, list_format: str) -> Path:
    candidates = [f"{split}.txt", f"{split}.json"] if list_format == "auto" else [f"{split}.{list_format}"]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / candidates[0]}: no such list file ({' or '.join(candidates)} expected in {folder})")


def _read_list(path: Path, folder: Path, classes: int, task: str) -> tuple[Sample, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list file ({type(exc).__name__}: {exc})") from None
    entries = _json_entries(path, text) if path.suffix == ".json" else _txt_entries(path, text)
    # SQT's JSON lists are relative to <task>/images/, the NOAH/FacT text lists to <task>/
    base = folder / "images" if path.suffix == ".json" else folder
    samples = []
    for origin, rel, label in entries:
        if not 0 <= label < classes:
            raise DataError(f"{origin}: label {label} out of range; {task} has {classes} classes (0..{classes - 1})")
        samples.append(Sample(os.path.normpath(base / rel), label, origin))
    if not samples:
        raise DataError(f"{path}: empty list, no images in this split")
    return tuple(samples)


def _txt_entries(path: Path, text: str) -> list[tuple[str, str, int]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        origin = f"{path}:{number}"
        if len(parts) != 2 or not _is_int(parts[1]):
            raise DataError(f"{origin}: expected 'relative/path label', got {line.strip()[:80]!r}")
        out.append((origin, parts[0], int(parts[1])))
    return out


def _json_entries(path: Path, text: str) -> list[tuple[str, str, int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(
            f'{path}: expected a JSON list of {{"relative/path": label}} objects, got {type(data).__name__}'
        )
    out = []
    for index, item in enumerate(data):
        origin = f"{path}: item {index}"
        if not (isinstance(item, dict) and len(item) == 1):
            raise DataError(f'{origin}: expected one {{"relative/path": label}} object, got {str(item)[:80]!r}')
        ((rel, label),) = item.items()
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{origin}: label of {rel!r} must be an integer, got {label!r}")
        out.append((origin, str(rel), label))
    return out


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _check_exist(samples: Iterable[Sample]) -> None:
    """Every listed image exists: one directory listing per folder (fast for 10^5 files), in list order."""
    listings: dict[str, frozenset[str] | None] = {}
    for sample in samples:
        parent, name = os.path.split(sample.path)
        if parent not in listings:
            try:
                listings[parent] = frozenset(os.listdir(parent))
            except OSError:
                listings[parent] = None
        listing = listings[parent]
        if listing is None:
            raise DataError(f"{sample.origin}: {parent}: no such folder (listed image {name})")
        if name not in listing:
            raise DataError(f"{sample.origin}: {sample.path}: no such image file")


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder


def _index_imagefolder(spec: ImageFolderData, data_root: str | Path | None) -> FileIndex:
    folder = resolve_root(spec.root, data_root)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (imagefolder root {spec.root!r}); {_HINT}")
    test_split = spec.test_split or next((s for s in ("val", "test") if (folder / s).is_dir()), "val")
    classes = _class_folders(folder / spec.train_split, spec.train_split)
    test_classes = _class_folders(folder / test_split, test_split, other=("val", "test") if not spec.test_split else ())
    unknown = [c for c in test_classes if c not in classes]
    if unknown:
        raise DataError(
            f"{folder / test_split / unknown[0]}: class folder not in {spec.train_split}/ "
            f"(its classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})"
        )
    labels = {name: i for i, name in enumerate(classes)}
    train = _folder_samples(folder / spec.train_split, classes, labels)
    test = _folder_samples(folder / test_split, test_classes, labels)
    return FileIndex(
        kind="imagefolder",
        task=task_key(spec),
        folder=folder,
        train_split=spec.train_split,
        test_split=test_split,
        num_classes=len(classes),
        classes=tuple(classes),
        train=train,
        test=test,
        fingerprint=_fingerprint(folder, train, test),
    )


def _class_folders(split: Path, name: str, other: Sequence[str] = ()) -> list[str]:
    if not split.is_dir():
        wanted = " or ".join(f"{o}/" for o in other) if other else f"{name}/"
        raise DataError(f"{split}: no such split folder ({wanted} expected in {split.parent})")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split}: no class folders (expected {name}/<class>/<image>)")
    return classes


def _folder_samples(split: Path, classes: Sequence[str], labels: dict[str, int]) -> tuple[Sample, ...]:
    samples = []
    for name in classes:
        class_dir = split / name
        files = sorted(
            entry.name
            for entry in os.scandir(class_dir)
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"{class_dir}: empty class folder (no {'/'.join(sorted(IMAGE_EXTENSIONS))} images)")
        samples += [Sample(str(class_dir / f), labels[name], str(class_dir / f)) for f in files]
    return tuple(samples)


def _fingerprint(folder: Path, train: Sequence[Sample], test: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for split, samples in (("train", train), ("test", test)):
        for s in samples:
            digest.update(f"{split}\t{os.path.relpath(s.path, folder)}\t{s.label}\n".encode())
    return digest.hexdigest()[:12]
