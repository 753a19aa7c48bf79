"""Generated image datasets on disk: VTAB-1k task folders (NOAH text lists or SQT JSON lists) and ImageFolder trees.

Images are small PNGs whose class is easy to learn (one colour per class plus a little noise), so a tiny ViT trained
for an epoch or two beats chance and the accuracy columns carry real numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (128, 128, 128),
]


def write_png(path: Path, label: int, seed: int, size: int = 12) -> None:
    rng = np.random.default_rng(seed)
    base = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
    pixels = base + rng.normal(0, 20, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def make_vtab_task(
    root: Path, task: str, num_classes: int, train_per_class: int = 4, test_per_class: int = 2, fmt: str = "txt"
) -> Path:
    """`root/<task>/` with images and the four lists (txt: NOAH/FacT layout; json: SQT layout under images/)."""
    folder = root / task
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    seed = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label in range(num_classes):
            for i in range(per_class):
                rel = f"{split}/{label}_{i}.png"
                write_png(folder / "images" / rel, label, seed=seed)
                seed += 1
                splits[split].append((rel, label))
    train = splits["train"]
    lists = {
        "train800val200": train,
        "train800": train[: len(train) * 4 // 5],
        "val200": train[len(train) * 4 // 5 :],
        "test": splits["test"],
    }
    for name, items in lists.items():
        if fmt == "txt":  # NOAH/FacT: paths relative to the task folder
            text = "".join(f"images/{rel} {label}\n" for rel, label in items)
            (folder / f"{name}.txt").write_text(text)
        else:  # SQT: a list of {path: label}, paths relative to <task>/images/
            (folder / f"{name}.json").write_text(json.dumps([{rel: label} for rel, label in items]))
    return folder


def make_imagefolder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 4, test: str = "val"
) -> Path:
    seed = 1000
    for split, count in (("train", per_class), (test, max(1, per_class // 2))):
        for label, name in enumerate(classes):
            for i in range(count):
                write_png(root / split / name / f"{i}.png", label, seed=seed)
                seed += 1
    return root


def make_data_root(root: Path) -> Path:
    """Two VTAB-1k tasks (kitti: 4 classes, text lists; patch_camelyon: 2 classes, JSON lists) + an ImageFolder."""
    make_vtab_task(root / "vtab-1k", "kitti", 4, fmt="txt")
    make_vtab_task(root / "vtab-1k", "patch_camelyon", 2, fmt="json")
    make_imagefolder(root / "pets")
    return root
