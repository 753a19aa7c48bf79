"""Datasets for the accuracy phase (the memory/speed phases use random tensors of the run's shape).

Every source yields normalised float batches at the model's resolution: resize (bicubic), clamp to [0, 1],
ImageNet mean/std (METHODS.md §0.3), no augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

import torch
import torch.nn.functional as F

from petlbench.errors import DataError
from petlbench.suite import DataSpec, DigitsData, SyntheticData

Split: TypeAlias = Literal["train", "test"]
Batch: TypeAlias = tuple[torch.Tensor, torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageSource(Protocol):
    """What the accuracy phase needs from a dataset."""

    @property
    def num_classes(self) -> int: ...

    def size(self, split: Split) -> int: ...

    def batches(
        self, split: Split, batch_size: int, img_size: int, *, shuffle: bool, seed: int, drop_last: bool = False
    ) -> Iterator[Batch]: ...


def normalize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """[N, C, h, w] in [0, 1] → [N, 3, img_size, img_size], bicubic, clamped, ImageNet-normalised."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-2:] != (img_size, img_size):
        images = F.interpolate(images, size=(img_size, img_size), mode="bicubic", align_corners=False)
        images = images.clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass(frozen=True)
class InMemorySource:
    """Small datasets held as low-resolution tensors; resized per batch so memory does not scale with img_size."""

    train_images: torch.Tensor  # [N, C, h, w] float in [0, 1]
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def size(self, split: Split) -> int:
        return len(self.train_labels if split == "train" else self.test_labels)

    def batches(
        self, split: Split, batch_size: int, img_size: int, *, shuffle: bool, seed: int, drop_last: bool = False
    ) -> Iterator[Batch]:
        images, labels = (
            (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        )
        n = len(labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield normalize(images[index], img_size), labels[index]


def load_data(spec: DataSpec) -> ImageSource:
    """The dataset a run trains and evaluates on."""
    if isinstance(spec, DigitsData):
        return _digits(spec)
    if isinstance(spec, SyntheticData):
        return _synthetic(spec)
    raise DataError(f"data.name: unsupported dataset {spec.name!r}")


def num_classes(spec: DataSpec) -> int:
    """Number of classes, without loading images when the spec says it."""
    if isinstance(spec, SyntheticData):
        return spec.num_classes
    return load_data(spec).num_classes


def _digits(spec: DigitsData) -> InMemorySource:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("data.name: digits needs scikit-learn; pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = _stratified_split(labels, spec.test_fraction, spec.split_seed)
    return InMemorySource(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], num_classes=10)


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _synthetic(spec: SyntheticData) -> InMemorySource:
    generator = torch.Generator().manual_seed(0)
    size = 16  # stored small; resized per batch like every other source

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.rand(n, 3, size, size, generator=generator)
        labels = torch.randint(spec.num_classes, (n,), generator=generator)
        return images, labels

    train_images, train_labels = make(spec.train_size)
    test_images, test_labels = make(spec.test_size)
    return InMemorySource(train_images, train_labels, test_images, test_labels, num_classes=spec.num_classes)
